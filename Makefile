# facetag: reproducible set-up, tests, benchmarks and trainings.
# Every target that needs the virtualenv creates it when it is missing, so `make test`
# works on a clean clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the build this project is tested with; override for another platform,
# e.g. `make setup TORCH_PIN="torch torchvision"`.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Offline data: a local copy of the face datasets (see data/README.md).
FACETAG_DATA_DIR ?= $(abspath ../shared/data)
export FACETAG_DATA_DIR

.PHONY: setup install test lint fmt check gradcheck bench demo clean train-orl train-yaleb \
	sweep ui ui-check weights weights-detector weights-embedder crops chips knn landmarks finetune

setup: $(STAMP)
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The landmark teacher (training only): MTCNN's MIT weights in facenet-pytorch, which
	# pins an old torch, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint test

gradcheck: $(STAMP)
	$(BIN)/facetag gradcheck

bench: $(STAMP)
	$(BIN)/facetag bench train
	$(BIN)/facetag bench infer

SEEDS ?= 0 1 2 3 4

# The issue's ORL protocol: split 5/5, one run per seed; each prints its JSON result.
# One thread: float sums depend on the thread count, so the same seed gives the same
# numbers only with the same count (and CPU).
train-orl: $(STAMP)
	for s in $(SEEDS); do \
		OMP_NUM_THREADS=1 $(BIN)/facetag train --config experiments/configs/orl.toml \
			--data $(FACETAG_DATA_DIR)/orl --seed $$s --json || exit 1; \
	done

train-yaleb: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/facetag train --config experiments/configs/yaleb.toml \
		--data $(FACETAG_DATA_DIR)/yaleb --json

sweep: $(STAMP)
	$(BIN)/facetag sweep --config experiments/configs/orl.toml --data $(FACETAG_DATA_DIR)/orl \
		--lrs 3e-3,1e-2 --batch-sizes 16,32

ui: $(STAMP)
	$(BIN)/facetag ui

# The dashboard as people see it: headless Chromium renders a smoke run's page, the
# registered model and the gradient-health figure from `facetag ui`; screenshots land in
# out/ui-check/ (apt-get install chromium).
ui-check: $(STAMP)
	FACETAG_UI_OUT=out/ui-check $(BIN)/pytest -q tests/training/test_ui_check.py

# Colour, in-the-wild identities the embedder learns from (never knn_examples: that is the
# test). `facetag data crops` cuts each photo's face with the shipped detector, exactly as
# tagging will; people in two sets (lfw and glint_celebs share four) are merged.
COLOUR_SETS ?= johns lfw glint_celebs celeba
CROPS ?= data/crops
KNN := $(FACETAG_DATA_DIR)/knn_examples

crops: $(STAMP)
	$(BIN)/facetag data crops $(addprefix $(FACETAG_DATA_DIR)/,$(COLOUR_SETS)) --out $(CROPS)

# The weights facetag ships, from the shared data with the configs' fixed seeds. One
# thread: bit-identical weights need the same thread count and CPU (and two threads on a
# busy machine were 13x slower for the detector).
weights: weights-detector weights-embedder

# The ONet's landmark targets: MTCNN and dlib's 5-point predictor as teachers (~25 min).
LANDMARKS ?= data/landmarks.json
landmarks: $(STAMP)
	test -f $(LANDMARKS) || $(BIN)/facetag data landmarks $(FACETAG_DATA_DIR) --out $(LANDMARKS)

# About 55 minutes on one core (3 epochs each for PNet, RNet and the ONet, then 4 of
# the ONet's landmark phase; run daed618014a545ec920b899624cb6824: 3,299 s).
weights-detector: landmarks
	OMP_NUM_THREADS=1 $(BIN)/facetag train-detector --config experiments/configs/detector.toml \
		--data $(FACETAG_DATA_DIR) --landmarks $(LANDMARKS) --out facetag/weights/detector.pt

# The shipped embedder: dlib's public-domain ResNet imported (float16, 11 MB), its
# threshold calibrated through the whole pipeline on LFW people A-M (never on N-Z, the
# verification set). `make finetune` is the fine-tuning run; it ships only if it beats
# this on LFW N-Z (experiments/LOG.md).
weights-embedder: $(STAMP)
	$(BIN)/facetag import dlib --half --out build/embedder.pt
	$(BIN)/facetag evaluate --pairs $(FACETAG_DATA_DIR)/lfw --people A-M --far 1e-3 \
		--calibrate --model build/embedder.pt
	cp build/embedder.pt facetag/weights/embedder.pt

# Aligned 150-px chips of the colour sets (LFW N-Z left out), cut as tagging cuts faces.
CHIPS ?= data/chips
chips: $(STAMP)
	$(BIN)/facetag data crops --aligned --size 150 \
		$(addprefix $(FACETAG_DATA_DIR)/,$(COLOUR_SETS)) --out $(CHIPS)

finetune: chips
	$(BIN)/facetag import dlib --out build/dlib-resnet.pt
	$(BIN)/facetag train --config experiments/configs/resnet.toml --data $(CHIPS) \
		--init build/dlib-resnet.pt --out build/resnet-finetuned.pt
	$(BIN)/facetag evaluate --pairs $(FACETAG_DATA_DIR)/lfw --model build/resnet-finetuned.pt
	$(BIN)/facetag evaluate --pairs $(FACETAG_DATA_DIR)/lfw --model build/dlib-resnet.pt

# The issue's tagging target with the shipped weights: enrol knn_examples/train, tag
# knn_examples/test, score against expected.csv.
knn: $(STAMP)
	$(BIN)/facetag enroll $(KNN)/train --gallery out/knn/gallery.json
	$(BIN)/facetag tag $(KNN)/test --gallery out/knn/gallery.json \
		--expected $(KNN)/expected.csv --csv out/knn/tags.csv

# The main job on a new machine: prove the gradients; train a detector with landmarks
# (fast config, teacher labels on two small sets unless make landmarks made them all);
# import dlib's public-domain ResNet; cut aligned chips with the new detector and fine-tune
# the ResNet on them with our backprop (MLflow records both trainings); enrol
# knn_examples/train and tag knn_examples/test with them; then the same with the shipped
# models. The data: FACETAG_DATA_DIR (default ../shared/data, see data/README.md); where
# it is missing, `facetag data fetch demo` first downloads what the demo needs into
# data/demo (WIDER FACE photos, LFW people, face_recognition's test photos from PyPI;
# FACETAG_FETCH_MIRROR=DIR reads the archives from a local mirror instead).
DEMO := out/demo
FETCHED := $(if $(wildcard $(FACETAG_DATA_DIR)/knn_examples),,data/demo)
DEMO_DATA := $(or $(FETCHED),$(FACETAG_DATA_DIR))
DEMO_KNN := $(DEMO_DATA)/knn_examples
DEMO_SETS := $(if $(FETCHED),lfw,johns glint_celebs)
# LFW's people have 8 photos here (johns' 11, glint_celebs' ~23): a 0.9 split would leave
# one test chip each, and evaluate needs same-person test pairs.
DEMO_SPLIT := $(if $(FETCHED),--split 0.6)
# make landmarks labels the shared data; fetched data gets its own labels.
DEMO_LANDMARKS := $(if $(FETCHED),$(DEMO)/landmarks-fetched.json,$(if $(wildcard $(LANDMARKS)),$(LANDMARKS),$(DEMO)/landmarks.json))
demo: $(STAMP)
	test -f $(DEMO_KNN)/expected.csv || $(BIN)/facetag data fetch demo --to $(DEMO_DATA)
	$(BIN)/facetag gradcheck
	test -f $(DEMO_LANDMARKS) || $(BIN)/facetag data landmarks \
		$(DEMO_DATA) $(addprefix --set ,$(DEMO_SETS)) --out $(DEMO_LANDMARKS)
	$(BIN)/facetag train-detector --config experiments/configs/detector-fast.toml \
		--data $(DEMO_DATA) --out $(DEMO)/detector.pt --landmarks $(DEMO_LANDMARKS)
	$(BIN)/facetag import dlib --out $(DEMO)/dlib-resnet.pt
	$(BIN)/facetag data crops --aligned --size 150 --detector $(DEMO)/detector.pt \
		--min-photos 2 $(addprefix $(DEMO_DATA)/,$(DEMO_SETS)) --out $(DEMO)/chips
	$(BIN)/facetag train --config experiments/configs/resnet-fast.toml --data $(DEMO)/chips \
		--init $(DEMO)/dlib-resnet.pt --out $(DEMO)/embedder.pt $(DEMO_SPLIT)
	$(BIN)/facetag evaluate --model $(DEMO)/embedder.pt --far 1e-2
	$(BIN)/facetag enroll $(DEMO_KNN)/train --gallery $(DEMO)/gallery.json \
		--model $(DEMO)/embedder.pt --detector $(DEMO)/detector.pt
	$(BIN)/facetag tag $(DEMO_KNN)/test --gallery $(DEMO)/gallery.json --model $(DEMO)/embedder.pt \
		--detector $(DEMO)/detector.pt --expected $(DEMO_KNN)/expected.csv \
		--csv $(DEMO)/tags.csv --annotate $(DEMO)/annotated
	@echo "Tags: $(DEMO)/tags.csv, annotated photos: $(DEMO)/annotated/"
	@echo "The same photos with the shipped models (make weights):"
	$(BIN)/facetag enroll $(DEMO_KNN)/train --gallery $(DEMO)/shipped/gallery.json
	$(BIN)/facetag tag $(DEMO_KNN)/test --gallery $(DEMO)/shipped/gallery.json \
		--expected $(DEMO_KNN)/expected.csv --csv $(DEMO)/shipped/tags.csv
	@echo "MLflow dashboard: make ui  (or .venv/bin/facetag ui), then open http://127.0.0.1:5000"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info out/demo out/knn
