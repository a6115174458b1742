# The two commands of the README. Both set up .venv first when needed (scripts/setup.sh).
VENV ?= .venv
ARGS ?=

.PHONY: setup train test
setup:
	@bash scripts/setup.sh

train: setup
	$(VENV)/bin/plugformer train $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(ARGS)
