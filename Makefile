# The two commands of the README. Both set up .venv first when needed (scripts/setup.sh).
VENV ?= .venv
ARGS ?=

.PHONY: setup train test browser
setup:
	@bash scripts/setup.sh

# Debian's Chromium for the HTML report test (apt-get when /usr/bin/chromium is missing).
browser:
	@bash scripts/install_chromium.sh

train: setup
	$(VENV)/bin/plugformer train $(ARGS)

test: setup browser
	$(VENV)/bin/python -m pytest $(ARGS)
