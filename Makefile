# lidar-completion: `make demo` and `make test` are the two commands a newcomer needs; both set up
# the environment first (once). `make help` lists everything.
#
# `make demo` sets up only what the demo needs (torch, the project, the ROS 2 wheels) and skips the
# MinkowskiEngine build (minutes of compiling on 2 cores): the shipped models run on the pure-PyTorch
# sparse backend, the faster one on a CPU. `make setup` / `make test` build it, for the parity tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PYTEST     ?= $(PY) -m pytest
PYTEST_ARGS ?=
# Tests run many small sparse-convolution passes and several processes (node, player) at once on
# 2 cores: one OpenMP thread per process avoids oversubscription (measured: the batched-forward test
# took 87-169 s with the default threads under load and 8 s with one). Override: make test OMP_NUM_THREADS=2
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

# `make setup` is a no-op while none of the files that define the environment change.
SETUP_INPUTS := Makefile scripts/setup/setup_venv.sh scripts/setup/install_minkowski.sh scripts/setup/common.sh \
                scripts/setup/build_interfaces.sh scripts/setup/prefix_wheel.py scripts/setup/ros2_tools.py \
                $(sort $(wildcard scripts/setup/tf2_msgs/* scripts/setup/tf2_msgs/*/*)) \
                lidar_completion_pkg/setup.py pyproject.toml
# ROS 2 tools (launch, ros2 CLI, sensor_msgs_py; not on PyPI, pure Python) are installed offline from
# this folder when it exists, as in CI, else built from their sources (scripts/setup/ros2_tools.py);
# setup re-runs when its wheels or the ament layout change.
ROS2_CLI_WHEELS ?= ../shared/ros2-cli-wheels
export ROS2_CLI_WHEELS
SETUP_INPUTS += lidar_completion_pkg/lidar_completion_pkg/ament_install.py $(wildcard $(ROS2_CLI_WHEELS)/*.whl)

SETUP_HASH   := $(shell (cat $(SETUP_INPUTS); echo "skip_minkowski=$(SKIP_MINKOWSKI) skip_tf2=$(SKIP_TF2_MSGS) skip_tools=$(SKIP_ROS2_TOOLS)") 2>/dev/null | sha256sum | cut -c1-16)
SETUP_STAMP  := $(VENV)/.stamp-setup-$(SETUP_HASH)
# the demo's environment: the same inputs, without MinkowskiEngine (a full setup serves as well)
DEMO_HASH    := $(shell (cat $(SETUP_INPUTS); echo "skip_minkowski=1 skip_tf2=$(SKIP_TF2_MSGS) skip_tools=$(SKIP_ROS2_TOOLS)") 2>/dev/null | sha256sum | cut -c1-16)
DEMO_STAMP   := $(VENV)/.stamp-demo-$(DEMO_HASH)

.PHONY: help setup demo-setup test test-slow test-torch test-minkowski test-all demo clean distclean

help: ## list the targets
	@echo "lidar-completion - make targets:"
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | \
	    awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "Variables: PYTEST_ARGS='-k foo' (extra pytest arguments), TEST_WORKERS=0 (the fast suite in one"
	@echo "process instead of 2), SKIP_MINKOWSKI=1 (setup without"
	@echo "MinkowskiEngine), SKIP_TF2_MSGS=1 (setup without building tf2_msgs, the node's /tf messages),"
	@echo "SKIP_ROS2_TOOLS=1 (setup without ros2 launch / topic / param where ROS2_CLI_WHEELS has none),"
	@echo "PYTHON_SYS=python3.11 (interpreter used to create $(VENV)),"
	@echo "TORCH_SPEC=torch==2.13.0 (PyPI's CUDA build instead of the CPU one, for an NVIDIA GPU)."

setup: $(SETUP_STAMP) ## create/update .venv (torch CPU, MinkowskiEngine, project, ROS 2 wheels); idempotent

$(SETUP_STAMP):
	PYTHON_SYS=$(PYTHON_SYS) VENV=$(VENV) SKIP_MINKOWSKI=$(SKIP_MINKOWSKI) SKIP_TF2_MSGS=$(SKIP_TF2_MSGS) \
	    SKIP_ROS2_TOOLS=$(SKIP_ROS2_TOOLS) bash scripts/setup/setup_venv.sh
	@rm -f $(VENV)/.stamp-setup-*
	@touch $@

demo-setup: ## create/update .venv with what the demo needs (no MinkowskiEngine build); idempotent
	@if [ ! -f $(SETUP_STAMP) ]; then $(MAKE) --no-print-directory $(DEMO_STAMP); fi

$(DEMO_STAMP):
	PYTHON_SYS=$(PYTHON_SYS) VENV=$(VENV) SKIP_MINKOWSKI=1 SKIP_TRITON=1 SKIP_TF2_MSGS=$(SKIP_TF2_MSGS) \
	    SKIP_ROS2_TOOLS=$(SKIP_ROS2_TOOLS) bash scripts/setup/setup_venv.sh
	@rm -f $(VENV)/.stamp-demo-*
	@touch $@

# --durations: every run (CI's included) ends with its slowest tests, the ones to look at when the
# fast suite nears its 15-minute budget.
# The fast suite (test, test-torch, test-minkowski) runs in TEST_WORKERS processes (pytest-xdist;
# 0 = one process): each test file in one of them, the files that start ROS 2 nodes all in the same
# one (tests/conftest.py), so no two DDS tests run at once. Measured on a 2-core CPU: the fast suite
# took 517 s with 2 workers, 795-864 s in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile,)

test: setup ## fast test suite (pytest -m "not slow"), in TEST_WORKERS processes (default 2)
	$(PYTEST) -m "not slow" $(XDIST) --durations=15 $(PYTEST_ARGS)

test-slow: setup ## slow tests only (pytest -m slow)
	$(PYTEST) -m slow $(PYTEST_ARGS)

test-torch: setup ## fast suite with MinkowskiEngine hidden (every command runs without it)
	LIDAR_COMPLETION_BACKEND=torch LIDAR_COMPLETION_HIDE_MINKOWSKI=1 $(PYTEST) -m "not slow" $(XDIST) $(PYTEST_ARGS)

# `auto` takes the torch backend on a CPU; this runs the whole suite again on the reference backend
test-minkowski: setup ## fast suite with MinkowskiEngine (the reference) wherever a backend is not named
	@$(PY) -c "import MinkowskiEngine" 2>/dev/null || { echo "MinkowskiEngine does not import in $(VENV):" \
	    "make setup builds it (not with SKIP_MINKOWSKI=1)"; exit 2; }
	LIDAR_COMPLETION_BACKEND=minkowski $(PYTEST) -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-all: setup ## every test, slow ones included
	$(PYTEST) $(PYTEST_ARGS)

demo: demo-setup ## set up what the demo needs (once), then run scripts/demo/demo.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo/demo.sh

clean: ## remove build artefacts and caches of the working tree (keeps .venv)
	rm -rf build dist .pytest_cache ros2_ws/build ros2_ws/install ros2_ws/log
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 | \
	    xargs -0 rm -rf

distclean: clean ## also remove .venv (the cached MinkowskiEngine wheel in ~/.cache is kept)
	rm -rf $(VENV)
