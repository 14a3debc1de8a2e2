"""The names of the files in a run folder (RUN/), in one place.

``lrcompress search`` writes them, ``export``/``eval``/``gate`` and ``lrcompress.load`` read them;
every module takes the names from here.
"""

MODEL_FILE = "model.safetensors"  # weights, with the plan in the header
PLAN_FILE = "plan.json"
REPORT_FILE = "report.json"  # written last: its presence means the run finished
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ONNX_FILE = "model.onnx"
STATE_DIR = "state"  # stage results an interrupted run resumes from
FINGERPRINT_FILE = "fingerprint.json"  # in STATE_DIR: what must be equal to resume
# Results a finished run leaves at the top of RUN/ (--overwrite removes these and state/ only).
RESULT_FILES = (MODEL_FILE, PLAN_FILE, REPORT_FILE, REPORT_MD, REPORT_HTML, ONNX_FILE,
                "model.onnx.data")
