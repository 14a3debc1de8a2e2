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
MANIFEST_FILE = "manifest.json"  # in STATE_DIR: every file outside state/ the run wrote
CACHE_DIR = "cache"  # the signal cache: kept by --overwrite (it depends only on the model)
SIGNALS_FILE = "signals.json"  # in CACHE_DIR
LOCK_FILE = ".lrcompress.lock"  # held while a process writes the folder (names the holder)
EXPORT_MANIFEST = "lrcompress-export.json"  # in an `export -o DIR` folder: what export wrote
# What a run written before manifests existed (lrcompress without state/manifest.json) has at the
# top of RUN/: --overwrite treats these, and state/, as that run's files.
LEGACY_RUN_FILES = (MODEL_FILE, PLAN_FILE, REPORT_FILE, REPORT_MD, REPORT_HTML, ONNX_FILE,
                    "model.onnx.data")
