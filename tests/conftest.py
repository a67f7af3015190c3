"""The suite's fixtures and its run-wide settings (XLA's flags, one compilation cache, a real
browser). Helpers live beside it: ``tests/reference.py`` (inputs and the independent float64
references) and ``tests/pages.py`` (what a page in the browser shows)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The suite is dominated by XLA compile time, not run time: skip LLVM's optimisation passes and
# emit the CPU's fused loops the older, quicker way (the same HLO; the machine code may round a
# reduction differently, which no test's tolerance notices; tests/lm/test_engine.py and
# tests/functional/test_flash.py compile and run in 70 s instead of 122 s); and compile each program's
# machine code in one piece, not split for threads that two busy workers leave no core for (the same
# two files and tests/lm/test_generate.py with -n 2: 46-49 s instead of 52-53 s). Must be set before
# JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                                   "--xla_cpu_parallel_codegen_split_count=1")
# Each op's location in the lowered program without the whole Python traceback (JAX keeps up to 100
# frames, pytest's included, by default): the same program, lowered and compiled a few percent sooner
# (measured: tests/functional/test_flash.py + tests/lm/test_generate.py in 26.6-27.3 s instead of
# 28.1-28.4 s). benchmarks/decode_profile.py, which reads the name stacks, turns it back on.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "false")
# One compilation cache for the run, in a fresh folder: both pytest-xdist workers and every
# process a test starts (they inherit this environment) reuse what another compiled. Set here,
# in the controlling process, before the workers start; removed when the run ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxattn-tests-xla-cache-")
    os.environ["JAXATTN_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    """The run's compilation cache goes with the process that made it."""
    if os.environ.get("JAXATTN_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Longest first: pytest-xdist hands out tests (and groups) in collection order, so the long ones,
# which collect last by their paths, would start last and leave one worker idle at the end.
LONG_FIRST = ("tests/parallel/", "tests/test_tour.py", "tests/test_benchmarks.py", "tests/test_docs.py",
              "tests/lm/test_induction.py", "tests/serve/test_http.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable: the rest keep their order


# ----------------------------------------------------------------------- a real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# CI installs Chromium and sets this, so that the browser tests cannot be skipped there.
REQUIRE_BROWSER = os.environ.get("JAXATTN_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's chromium and chromium-driver) driven by Selenium, one per
    test process, with its console log kept. The flags keep it off the network: no background
    requests, no component updates, no sync."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing and not REQUIRE_BROWSER:
        pytest.skip(f"no {', '.join(missing)} (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
