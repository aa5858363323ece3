# Front door for newcomers. `make run` and `make test` install missing Debian packages, configure, build and run.
# Build trees: build/release (default), build/debug, build/asan. JOBS defaults to the core count.
JOBS ?= $(shell nproc)
BUILD ?= build/release
CMAKE_FLAGS ?=

.PHONY: all deps configure build run test test-gpu asan debug clean format check-sizes fuzz-smoke bench

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja: | deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

configure: $(BUILD)/build.ninja

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# Runs the main job on the shipped tiny model (see README: what that model is).
run: build
	scripts/make-run.sh $(BUILD)

test: build
	scripts/check-sizes
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)
	scripts/fuzz-smoke.sh

# GPU parity + model tests (run on the GPU box; skip cleanly without a device).
test-gpu: build
	cd $(BUILD) && ctest --output-on-failure -R 'ops|model'

debug:
	$(MAKE) build BUILD=build/debug CMAKE_FLAGS="-DCMAKE_BUILD_TYPE=Debug $(CMAKE_FLAGS)"

asan:
	$(MAKE) test BUILD=build/asan CMAKE_FLAGS="-DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSV4_SANITIZE=ON -DDSV4_CUDA=OFF $(CMAKE_FLAGS)"

format:
	git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | xargs clang-format -i

check-sizes:
	scripts/check-sizes

fuzz-smoke: deps
	scripts/fuzz-smoke.sh

clean:
	rm -rf build
