# egress-snat. `make` alone lists the targets.
# Tests and the demo need root: they build network namespaces and never touch
# the root namespace.

export PATH := /usr/local/go/bin:$(PATH):/usr/sbin:/sbin

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# Set to 0 to skip the runs of the namespace tests on iptables-legacy and on
# the nftables backend (after the one on the host's iptables).
EGRESS_SNAT_BOTH_BACKENDS ?= 1
# One package's tests may take 13 minutes on a quiet 2-core machine (the
# CLI's namespace tests) and three times that under load: the timeout is a
# guard against a hang, not a goal.
TESTFLAGS ?= -count=1 -p 1 -timeout 45m

.DEFAULT_GOAL := help
.PHONY: bench-daemon bench-gate bench-idle bench-pools bench-scale help build deps docs deb lint fmt vet test test-race test-legacy test-nftables demo bench fuzz clean

help: ## list the targets
	@awk -F':.*## ' '/^[a-z-]+:.*## / { printf "  %-12s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

build: ## build bin/egress-snat, version from git describe
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o bin/egress-snat ./cmd/egress-snat

docs: ## regenerate the man page and completions from the CLI (docs/man, contrib/completion)
	$(GO) run ./cmd/egress-snat gen-docs .

# nfpm builds the .deb; installed from the Go module proxy on first use.
NFPM ?= bin/tools/nfpm
NFPM_VERSION ?= v2.45.2

$(NFPM):
	GOBIN=$(abspath $(dir $(NFPM))) $(GO) install github.com/goreleaser/nfpm/v2/cmd/nfpm@$(NFPM_VERSION)

deb: $(NFPM) ## build the Debian package into build/deb/ (version from git describe)
	NFPM=$(NFPM) GO=$(GO) bash scripts/deb.sh

STATICCHECK ?= bin/tools/staticcheck
STATICCHECK_VERSION ?= v0.8.2

$(STATICCHECK):
	GOBIN=$(abspath $(dir $(STATICCHECK))) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

lint: $(STATICCHECK) ## shellcheck every shell script, gofmt, staticcheck (all must be clean)
	STATICCHECK=$(STATICCHECK) bash scripts/lint.sh

fmt: ## gofmt every Go file in place
	$(GO) fmt ./...

# deploy/kubernetes is a module of its own (k8s.io/api stays out of ours).
SUBMODULES := deploy/kubernetes

vet: ## go vet ./... (and the deploy/kubernetes module)
	$(GO) vet ./...
	@for m in $(SUBMODULES); do echo "cd $$m && $(GO) vet ./..."; (cd $$m && $(GO) vet ./...) || exit 1; done

test: deps vet test-race ## deps, vet, test-race, all tests (root: namespace tests), then test-legacy and test-nftables unless EGRESS_SNAT_BOTH_BACKENDS=0
	$(GO) test $(TESTFLAGS) ./...
	@for m in $(SUBMODULES); do echo "cd $$m && $(GO) test $(TESTFLAGS) ./..."; (cd $$m && $(GO) test $(TESTFLAGS) ./...) || exit 1; done
	@if [ "$(EGRESS_SNAT_BOTH_BACKENDS)" != "0" ]; then $(MAKE) --no-print-directory test-legacy test-nftables; fi

# The packages that start goroutines (snat's manager, watch, verify's flows,
# the lab's probe and captures) or are shared by them, under the race
# detector. The e2e tests of cmd/egress-snat run a binary built without it,
# so only its in-process tests are here; a race run of them would take the
# whole e2e time again for nothing. About 2 minutes in all.
RACEPKGS ?= ./snat ./backend/iptables ./selector ./config ./pending ./stats ./conntrack ./verify ./natscan ./internal/lab ./internal/lockfile
RACECMD  ?= TestPendingEntriesRoundTrip|TestDocs|TestVersion

test-race: ## the packages with goroutines under go test -race (bounded: RACEPKGS)
	$(GO) test -race $(TESTFLAGS) $(RACEPKGS)
	$(GO) test -race $(TESTFLAGS) -run '$(RACECMD)' ./cmd/egress-snat

# The namespace tests are the packages whose tests use internal/lab. The
# passes on the other backends leave out those whose tests never touch a
# backend's rules (the route lookups of selector, the lab's own tests) or
# run the default backend only (the Ansible role): minutes each, for
# nothing the first pass did not show.
NSPKGS = $$($(GO) list -f '{{.ImportPath}} {{join .TestImports " "}} {{join .XTestImports " "}}' ./... | awk '$$0 ~ /\/internal\/lab( |$$)/ { print $$1 }' | grep -Ev '$(BACKEND_AGNOSTIC)')
BACKEND_AGNOSTIC ?= /selector$$|/internal/lab$$|/deploy/ansible$$

test-legacy: ## the namespace tests again with EGRESS_SNAT_IPTABLES=legacy (those that touch a backend)
	@pkgs=$(NSPKGS); \
	if [ -z "$$pkgs" ]; then echo "test-legacy: no package uses internal/lab"; exit 1; fi; \
	echo "EGRESS_SNAT_IPTABLES=legacy $(GO) test $(TESTFLAGS)" $$pkgs; \
	EGRESS_SNAT_IPTABLES=legacy $(GO) test $(TESTFLAGS) $$pkgs

test-nftables: ## the namespace tests again on the native nftables backend, EGRESS_SNAT_BACKEND=nftables (those that touch a backend)
	@pkgs=$(NSPKGS); \
	if [ -z "$$pkgs" ]; then echo "test-nftables: no package uses internal/lab"; exit 1; fi; \
	echo "EGRESS_SNAT_BACKEND=nftables $(GO) test $(TESTFLAGS)" $$pkgs; \
	EGRESS_SNAT_BACKEND=nftables $(GO) test $(TESTFLAGS) $$pkgs

# The demo installs only what it runs (iptables, ipset, iproute2); the tests
# also need nftables, conntrack, tcpdump, docker.io, firewalld and dbus.
deps: ## apt-get install what the tests need, if missing (scripts/lab.sh test-deps; starts no daemon)
	bash scripts/lab.sh test-deps

demo: ## install iptables, ipset and iproute2 if missing, then show the problem and the fix in a namespace lab (root)
	bash scripts/demo.sh

bench-idle: ## CPU and memory of an idle watch at 10k and 100k destinations (scripts/bench-idle.sh)
	bash scripts/bench-idle.sh

bench-gate: ## CI's regression gate: apply and no-op apply of 10k destinations against a raw iptables-restore, both backends (root)
	bash scripts/bench-gate.sh

bench: ## benchmarks (scripts/bench.sh, scripts/bench-scale.sh, then scripts/bench-pools.sh): docs/BENCHMARKS.md
	bash scripts/bench.sh
	bash scripts/bench-scale.sh
	bash scripts/bench-pools.sh

bench-pools: ## issue 24's rows alone: a pool's spread of sources, weight accuracy, a port range running out (scripts/bench-pools.sh)
	bash scripts/bench-pools.sh

bench-scale: ## issue 13's rows alone: 100 to 1M destinations, incremental changes, idle watch (scripts/bench-scale.sh)
	bash scripts/bench-scale.sh

bench-daemon: ## issue 21's rows: set, apply -f, list, check at 100k, on their own and sent to a running watch (scripts/bench-daemon.sh)
	bash scripts/bench-daemon.sh

fuzz: ## fuzz tests (scripts/fuzz.sh)
	bash scripts/fuzz.sh

clean: ## remove bin/ and build/
	rm -rf bin build
