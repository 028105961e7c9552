# Lodge: build, test, demo. `make demo` and `make test` are the two
# commands the README promises.
SHELL := /bin/bash
GO ?= go
BIN := bin/lodge
GUEST := build/guest/tiny.qcow2
GOLANGCI_VERSION := v2.6.2
GOLANGCI := build/tools/golangci-lint
GO_SOURCES := $(shell find . -name '*.go' -not -path './build/*') go.mod go.sum

.PHONY: all build guest deps test unit integration lint fuzz demo demo-clean bench bench-quick clean

all: build

deps:
	@scripts/deps.sh run guest

PROBE := bin/lodge-probe

$(BIN): $(GO_SOURCES)
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/lodge

# The benchmark probe is copied into guests: static and stripped, so it
# runs on any Linux guest and crosses the agent's channel quickly.
$(PROBE): $(GO_SOURCES)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $(PROBE) ./cmd/lodge-probe

build: $(BIN) $(PROBE)

$(GUEST): $(shell find guest -type f 2>/dev/null)
	bash guest/build.sh

guest: deps $(GUEST)

$(GOLANGCI):
	GOBIN=$(CURDIR)/build/tools $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_VERSION)

lint: $(GOLANGCI)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GOLANGCI) run ./...

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /test/integration)

# Integration tests boot the tiny guest under real QEMU; they share one
# built binary and one guest image.
integration: build guest
	LODGE_BIN=$(CURDIR)/$(BIN) LODGE_GUEST=$(CURDIR)/$(GUEST) \
	  $(GO) test -count=1 -timeout 40m -v ./test/integration/

test: deps lint unit integration

# Each new input that widens coverage is minimized first, for up to a
# minute by default; with qcow2 images of tens of KiB as seeds that left a
# 20 s run doing little else.
fuzz:
	for t in $$(grep -rl 'func Fuzz' --include='*_test.go' . | xargs -n1 dirname | sort -u); do \
	  for f in $$(grep -ho 'func Fuzz[A-Za-z0-9_]*' $$t/*_test.go | cut -d' ' -f2); do \
	    $(GO) test -run=NONE -fuzz="^$$f$$" -fuzztime=20s -fuzzminimizetime=2s $$t || exit 1; done; done

demo: deps build guest
	@bash scripts/demo.sh

demo-clean:
	@bash scripts/demo.sh clean

# The suite against libvirt (about 15 minutes; bench-quick runs each
# scenario once). Results: bench/results.md and bench/charts/.
bench: build guest
	@bash bench/run.sh

bench-quick: build guest
	@bash bench/run.sh --quick

clean:
	rm -rf bin build/integration.log
