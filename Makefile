PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the pins change; deleting .venv forces a full rebuild.
STAMP := $(VENV)/.installed

ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv serve test lint openapi bench lock clean distclean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# --no-deps on purpose: the lock is the whole environment, and resolving neural-tangents' declared
# dependencies would pull in tensorflow + tf2jax (see requirements.lock). `pip check` must then report
# those two and nothing else, which catches a pin added to pyproject.toml but not to the lock.
$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install --no-deps -r requirements.lock
	$(BIN)/python -m pip install --no-deps -e .
	@if $(BIN)/python -m pip check | grep -v -E ' requires (tensorflow|tf2jax), which is not installed|^No broken requirements'; then \
		echo "pip check: broken requirements above; update requirements.lock (make lock)" >&2; \
		exit 1; \
	fi
	touch $@

serve: venv
	$(BIN)/ntk-unlearn serve $(ARGS)

# with-redis.sh starts a private redis-server, exports REDIS_URL, and exits with pytest's status
# (so pytest's 5, "no tests collected", fails too).
test: venv
	bash scripts/with-redis.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

openapi: venv
	$(BIN)/python -m app.openapi_export openapi/openapi.json

bench: venv
	$(BIN)/ntk-unlearn bench $(ARGS)

# Rewrites requirements.lock from the current venv, keeping its header comment.
lock:
	test -x $(BIN)/python
	{ sed '/^[^#]/,$$d' requirements.lock; $(BIN)/python -m pip freeze --exclude ntk-unlearn; } > requirements.lock.new
	@if grep -i -E '^(tensorflow|tf2jax)([=<> ]|$$)' requirements.lock.new; then \
		echo "lock: tensorflow/tf2jax must stay out of the lock" >&2; rm requirements.lock.new; exit 1; \
	fi
	mv requirements.lock.new requirements.lock

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
