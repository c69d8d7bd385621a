# Bubuh: the verbs a newcomer uses. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
BUBUH  := $(VENV)/bin/bubuh
STACK  := deploy/local/stack.sh
OPS_SH := deploy/local/ops.sh
RULES  := deploy/prometheus/rules.yml
OPS    ?=
PROTOS := $(wildcard proto/bubuh/v1/*.proto)
GEN    := services/contracts/bubuh/v1/.generated
PYTEST_ARGS ?= --durations=15

.PHONY: help setup system-packages proto contract contract-baseline imports up ops rules down run status test test-fast bench surge surge-deadline surge-sustained surge-levels surge-members surge-fairness surge-eta eta-replay surge-open surge-tiers surge-tier-members capacity lint docs clean distclean

help: ## list the verbs
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(GEN): $(PROTOS) $(VENV)/.installed
	@mkdir -p services/contracts
	$(PY) -m grpc_tools.protoc -I proto --python_out=services/contracts --pyi_out=services/contracts $(PROTOS)
	@# protoc names a proto import by its proto path (bubuh.v1); the package lives under services.contracts
	sed -i -E 's/^from bubuh\.v1( import|\.)/from services.contracts.bubuh.v1\1/' $(@D)/*_pb2.py $(@D)/*_pb2.pyi
	@touch $@

DEVCA  := .local/keys/issuer-rsa2048.p12

$(DEVCA): | $(VENV)/.installed $(GEN)
	$(BUBUH) keys dev-ca --if-missing

DEVPKI := .local/pki/signer.p12

$(DEVPKI): | $(VENV)/.installed $(GEN)
	$(BUBUH) keys dev-pki --if-missing

setup: $(VENV)/.installed $(GEN) $(DEVCA) $(DEVPKI) ## virtualenv in .venv, generated protobuf code, dev signing keys and test PKI (idempotent)
	@# bytecode for our own modules, written now: with PYTHONDONTWRITEBYTECODE set (as on these machines)
	@# every process the tests start would compile them again (~0.3 s of CPU each, hundreds of processes)
	@$(PY) -m compileall -q -j 0 services tests loadtests

proto: $(GEN) ## generate Python code from proto/ (never edit the output)

# buf checks the contracts (buf.yaml). Built from source by Go's own toolchain at a pinned version,
# into .local (nothing binary in the repository): the Go module proxy and checksum database vouch
# for the source.
BUF_VERSION := v1.75.0
BUF         := .local/tools/buf-$(BUF_VERSION)/buf
BASELINE    := proto/baseline.binpb

$(BUF):
	@command -v go >/dev/null || { echo "buf is built with Go 1.26+ (Debian: apt-get install golang, or go.dev/dl)"; exit 1; }
	GOBIN=$(abspath $(@D)) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)

contract: $(BUF) ## buf lint, and buf breaking against the committed baseline image (proto/baseline.binpb)
	$(BUF) lint
	$(BUF) breaking --against $(BASELINE)

contract-baseline: $(BUF) ## rewrite proto/baseline.binpb from proto/: only for a reviewed, deliberate contract change
	$(BUF) build --exclude-source-info -o $(BASELINE)

system-packages: ## Debian packages the platform and its tests use (PostgreSQL, poppler, NSS tools, SoftHSM2)
	deploy/local/system-packages.sh

up: setup ## start Kafka (SASL/SCRAM + ACLs, credentials in .local/kafka/credentials), PostgreSQL, the test PKI (CRL, OCSP, TSA) and the platform in the background (a process per tier, as production; BUBUH_LOCAL_LAYOUT=shared: API + light workers in one); OPS=1 also Prometheus + Alertmanager
	$(STACK) up
	$(BUBUH) up
	$(if $(filter 1 yes true,$(OPS)),$(OPS_SH) start)

ops: setup ## Prometheus (127.0.0.1:19090) + Alertmanager (127.0.0.1:19094) for the running platform, rules from deploy/prometheus, config in .local/ops
	$(OPS_SH) start

rules: ## promtool check rules + the alert unit tests (deploy/prometheus/rules.test.yml)
	@command -v promtool >/dev/null || $(OPS_SH) install
	promtool check rules $(RULES)
	promtool test rules deploy/prometheus/rules.test.yml

down: ## stop Prometheus + Alertmanager, the platform, the test PKI, Kafka and PostgreSQL
	$(OPS_SH) stop
	-@test -x $(BUBUH) && $(BUBUH) down
	$(STACK) down

status: ## what is running
	-$(STACK) status
	-@test -x $(BUBUH) && $(BUBUH) status
	-@$(OPS_SH) status

run: setup ## the platform in the foreground on the local stack, with the walkthrough; Ctrl-C stops it
	deploy/local/run.sh

# Tests isolate themselves by topic and schema prefixes, so most run on TEST_WORKERS workers at once
# (whole files per worker); those marked `exclusive` (they compare latencies or CPU shares) run alone first, on a
# stack the suite has not yet filled with hundreds of test topics and schemas (after them it failed:
# README, "The suite"). pytest's exit code 5 (nothing collected) in both phases fails.
TEST_WORKERS ?= 3

test: setup system-packages ## everything: unit, integration, end-to-end, chaos (real Kafka + PostgreSQL)
	$(STACK) up
	@rc1=0; rc2=0; \
	$(PY) -m pytest -m exclusive $(PYTEST_ARGS) || rc2=$$?; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not exclusive" $(PYTEST_ARGS) || rc1=$$?; \
	if [ $$rc1 -eq 5 ] && [ $$rc2 -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; \
	for rc in $$rc1 $$rc2; do if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; done

test-fast: setup ## unit + component tiers: handlers and the pipeline on real PostgreSQL, no Kafka, about a minute
	$(PY) -m pytest -m "not slow" tests/unit tests/component $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] && exit $$rc || exit 1

bench: setup system-packages ## the purchase pipeline on the local stack vs PostgreSQL's own ceiling, then the stamping engine vs pyHanko's default path
	-@test -x $(BUBUH) && $(BUBUH) down
	$(STACK) up
	$(PY) -m loadtests.bench_pipeline --out loadtests/results/pipeline.json --readme README.md --profile-dir loadtests/results --label after
	$(PY) -m loadtests.bench_pipeline --mode backlog --out loadtests/results/pipeline-backlog.json --readme README.md --label after
	-$(STACK) down
	$(PY) -m loadtests.bench_engine --out loadtests/results/engine.json --readme README.md

surge: up ## the deadline day (surge-deadline, 3 rounds), then the PAdES levels (surge-levels): about 75 minutes; loadtests/results/surge.json, its PNG plots and README.md
	$(MAKE) surge-deadline
	$(MAKE) surge-levels

surge-deadline: up ## a compressed CPNS peak (ramp, plateau, late spike; channels of unequal size; purchases beside stamps) with a worker SIGKILLed, PostgreSQL read-only 10 s and the broker restarted mid-run, then the same arrivals against a synchronous baseline; 3 rounds, medians reported: loadtests/results/surge.json, surge-*.png, README.md
	$(PY) -m loadtests.deadline_day --rounds 3 --out loadtests/results/surge.json --readme README.md

surge-sustained: up ## issue 12, point 1 as written: the engine alone measured on the idle platform, then Poisson arrivals at 1.05 x 30% of it for 10 min with purchases beside them, 3 rounds: stamps completed in the window per second, >= 30% of the engine? All completed, ledger exact? loadtests/results/surge-sustained.json and README.md
	$(PY) -m loadtests.sustained --rounds 3 --out loadtests/results/surge-sustained.json --readme README.md

surge-levels: up ## the closed-loop surge at PAdES B-B and B-LT (platform restarted per level, 3 rounds): B-LT >= 85% of B-B's stamps/s? Figures in loadtests/results/surge-levels.json and README.md
	$(PY) -m loadtests.surge --levels b-b,b-lt --rounds 3 --out loadtests/results/surge-levels.json --readme README.md

surge-members: up ## the same surge at B-LT with one and with two stamping workers (3 rounds): two within 10% of one, each 40-60% of the stamps, no lock wait over 50 ms? Figures in loadtests/results/surge-members.json and README.md
	$(PY) -m loadtests.surge --levels b-lt --members 1,2 --rounds 3 --out loadtests/results/surge-members.json --readme README.md

surge-fairness: up ## one channel flooding (1,600 stamps) beside two small ones (200 each, 2 in flight until each ends: the flood is 80% of the stamps, as issue 12 says), against a small one alone, 3 rounds on the running platform: each small channel's p99 within 2x of its p99 alone? loadtests/results/surge-fairness.json and README.md
	$(PY) -m loadtests.surge --fairness --rounds 3 --stamps 200 --flood 1600 --concurrency 8 --out loadtests/results/surge-fairness.json --readme README.md

surge-eta: up ## ETAs people can plan by (issue 12, point 4): 3 channels each keep 20 s of the tier's pace unfinished (measured first) and send 60 s of it more, 3 rounds: of the requests that joined the standing queue, >= 90% completed within 25% of their first ETA? loadtests/results/surge-eta.json and README.md
	$(PY) -m loadtests.held_queue --rounds 3 --out loadtests/results/surge-eta.json --readme README.md

eta-replay: ## replay the ETA forecast in the working tree over the last make surge-eta's requests (.local/results/surge-eta-requests.jsonl, with the stamping schema's times; the local stack's PostgreSQL up): told and replayed, within 25% per round and phase
	$(PY) -m loadtests.eta_replay

surge-open: up ## the front door open loop (issue 12, point 2), about an hour: a closed-loop surge measures the sustainable stamps/s, then 3 rounds of Poisson arrivals at 80% of it for 10 min and 3x for 60 s: intake and status p99 per phase at the rounds' median, the spike's queue, the drain. loadtests/results/surge-open.json and README.md
	$(PY) -m loadtests.open_loop --plateau 600 --spike 60 --rounds 3 --out loadtests/results/surge-open.json --readme README.md

surge-tiers: up ## the surge at B-LT with a process per tier (BUBUH_LOCAL_LAYOUT=tiers, 3 rounds): each tier's CPU ms per stamp, in loadtests/results/surge-tiers.json for docs/capacity.md
	BUBUH_LOCAL_LAYOUT=tiers $(PY) -m loadtests.surge --levels b-lt --members 1 --rounds 3 --out loadtests/results/surge-tiers.json

surge-tier-members: up ## the surge at B-LT with one and with two members of every tier (a process per tier; the API's share one port), 3 rounds of 4 x 500 stamps, 100 applicants a channel buying 5 stamps each: two within 10% of one, each 40-60% of its tier's work, no lock wait over 50 ms? loadtests/results/surge-tier-members.json and README.md
	$(PY) -m loadtests.surge --levels b-lt --tier-members 1,2 --rounds 3 --stamps 500 --applicants 100 --out loadtests/results/surge-tier-members.json --readme README.md

capacity: setup ## docs/capacity.md: pods, partitions and KEDA lag thresholds for 1,000,000 stamps an hour, from the measured CPU; fails when deploy/k8s differs
	$(PY) -m loadtests.capacity

imports: setup ## import-linter: services never import each other, the kernel imports no service, no service imports the operator's tools, routers leave SQL to domain objects
	$(VENV)/bin/lint-imports

lint: setup contract rules imports ## ruff, buf lint, buf breaking, promtool (rules and their tests), import boundaries
	$(VENV)/bin/ruff check services tests loadtests

docs: setup ## regenerate docs/errors.md and docs/topics.md from the code's catalogues
	{ echo "# Error codes"; echo; echo "Generated by \`make docs\` from \`services/kernel/errors.py\`."; echo; $(BUBUH) errors --markdown; } > docs/errors.md
	{ echo "# Topics"; echo; echo "Generated by \`make docs\` from \`services/kernel/topics.py\`. Names get \`BUBUH_TOPIC_PREFIX\` in front."; echo; $(BUBUH) topics --markdown; } > docs/topics.md

clean: ## remove the virtualenv and generated code
	rm -rf $(VENV) services/contracts/bubuh *.egg-info

distclean: down clean ## also remove everything the local stack wrote (.local/)
	rm -rf .local
