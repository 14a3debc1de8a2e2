# The two commands of the README. Each one sets up everything it needs on a fresh machine:
# a virtual environment in .venv with lrcompress installed, and Debian's Fashion-MNIST.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test data lint clean

demo: $(STAMP) data
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/fashion_mnist/demo.sh

test: $(STAMP) data
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs apt-get, as root).
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (tests that need it are skipped)."; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
