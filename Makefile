# Two commands for a fresh machine:  `make run` (the main job)  and  `make test` (the suite).
# Both build the virtual environment in .venv first; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/default

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch goes in first, so the range in pyproject.toml is already satisfied.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.4,<2.14"; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]"
	# DeepSpeed compiles its CPU ops (the optimizer, the shared-memory collectives) on first use, about 100 s on 2 cores:
	# here, once, rather than as a silent pause in the first training. A GPU machine builds its CUDA ops when used.
	command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		[get_accelerator().create_op_builder(op).load(verbose=False) for op in ('FusedAdamBuilder', 'ShareMemCommBuilder')]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/polyrec pipeline --output $(RUN_DIR) $(ARGS)

# The KubeRay manifests' tests render k8s/ with `kubectl kustomize`.
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { echo "make test needs kubectl, which includes kustomize (it renders k8s/):" \
		"install it, see https://kubernetes.io/docs/tasks/tools/" >&2; exit 1; }

# The web page's test drives Debian's chromium headless (Playwright, without its own browser downloads).
chromium:
	command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium)

# ruff's settings are in pyproject.toml; `make format` applies what `lint` checks.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint kubectl chromium
	$(BIN)/python -m pytest -q tests

.PHONY: venv run lint format test kubectl chromium
