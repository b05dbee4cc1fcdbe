# edgekd: `make demo` (venv + install + end-to-end demo on the built-in data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A matched torch/torchvision pair (a mismatched pair fails at `import torchvision`).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= runs/demo
DEMO_BUNDLE ?= $(DEMO)/student/bundle
# pytest-xdist workers for `make test` (each test runs single-threaded, so one worker per core; at most 4 keeps the
# full-size recipe checks, ~6 GB each, within a small machine's memory). TEST_JOBS=0 runs the suite in one process.
TEST_JOBS ?= auto

.PHONY: install demo test test-fast bench zoo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[train,dev,dicom,serve]"
	$(BIN)/python -c "import timm, torchvision.ops, onnxruntime, openvino, nncf; print('install ok')"
	touch $@

demo: install
	$(BIN)/edgekd train recipes/demo/teacher.yaml --out $(DEMO)/teacher
	$(BIN)/edgekd train recipes/demo/student.yaml --out $(DEMO)/student --set distill.teacher=$(DEMO)/teacher/best.pt
	$(BIN)/edgekd train recipes/demo/baseline.yaml --out $(DEMO)/baseline
	$(BIN)/edgekd eval $(DEMO)/teacher/best.pt --split val,test
	$(BIN)/edgekd eval $(DEMO)/student/best.pt --split val,test
	$(BIN)/edgekd eval $(DEMO)/baseline/best.pt --split val,test
	$(BIN)/edgekd export $(DEMO)/student/best.pt --format onnx,openvino --precision fp32,int8 --out $(DEMO_BUNDLE) --zip --drop-failed
	$(BIN)/python scripts/demo_images.py $(DEMO)/images
	$(BIN)/edgekd predict $(DEMO_BUNDLE) $(DEMO)/images --tta --out $(DEMO)/predictions.csv
	$(BIN)/python scripts/demo_images.py --score $(DEMO)/predictions.csv
	@echo "demo done: see $(DEMO)/ (checkpoints, metrics.json, curves.png, confusion_test.png, roc_test.png, bundle, predictions.csv)"

test: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --maxprocesses 4

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --maxprocesses 4 -m "not slow"

# Every published figure, in pipeline order (runs that exist for the same recipe are reused). Latency last, on a
# quiet machine: benchmarks/latency.py exports both models into runs/bench/latency/, the runtime benchmark then
# times the student's bundle from there (and the smaller micro student's); all merge into
# benchmarks/results/latency.json.
BENCH_TEACHER ?= runs/bench/pneumonia/teacher/best.pt
BENCH_STUDENT ?= runs/bench/pneumonia/student-s0/best.pt
BENCH_MICRO   ?= runs/bench/pneumonia/student_micro-s0/best.pt
bench: install
	$(BIN)/python benchmarks/accuracy.py --roles teacher teacher-resnet18 baseline --reuse
	$(BIN)/python benchmarks/distill.py --reuse
	$(BIN)/python benchmarks/distill.py --student micro --reuse
	$(BIN)/python benchmarks/continual.py --seeds 0 1 2 --single-head
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/continual.py --only cross_domain --pair retina-pneumonia --students cnn mobilenetv3 --seeds 0 1 2 --joint --single-head
	$(BIN)/python benchmarks/export.py --checkpoint $(BENCH_TEACHER) --checkpoint $(BENCH_STUDENT)
	$(BIN)/python benchmarks/latency.py --teacher $(BENCH_TEACHER) --student $(BENCH_STUDENT)
	$(BIN)/python benchmarks/latency_runtime.py runs/bench/latency/bundle-student --checkpoint $(BENCH_STUDENT)
	$(BIN)/edgekd export $(BENCH_MICRO) --format onnx,openvino --precision fp32,int8 --out runs/bench/latency/bundle-student-micro
	$(BIN)/python benchmarks/latency_runtime.py runs/bench/latency/bundle-student-micro --checkpoint $(BENCH_MICRO)
	$(BIN)/python benchmarks/pareto.py
	$(BIN)/python benchmarks/distill_terms.py --reuse
	$(BIN)/python benchmarks/robustness.py --teacher $(BENCH_TEACHER) --student $(BENCH_STUDENT)

# The seeds' own architectures at their input sizes (train from scratch, export, bench): hours on 2 cores.
zoo: install
	$(BIN)/python benchmarks/zoo.py --arch mobilenetv3_large_100 resnet18 efficientnet_b2 resnet50 resnet101 convnextv2_tiny --limit 1000 --epochs 5 --eval-limit 400 --reuse
	$(BIN)/python benchmarks/zoo.py --arch vit_small_patch16_224 swinv2_tiny_window8_256 --limit 1000 --epochs 8 --eval-limit 400 --reuse
	$(BIN)/python benchmarks/export_time.py --arch efficientnet_b2 mobilenetv3_large_100 resnet18 vit_small_patch16_224

clean:
	rm -rf $(DEMO) .pytest_cache
