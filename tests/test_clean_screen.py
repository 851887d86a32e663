"""A normal run shows the project's own lines and progress bars, and no library's warnings (issue #30)."""
import logging
import re

from conftest import DATA, needs_data, run_script

# What a library's warning looks like on the screen: Python's warnings ("UserWarning: ...", the
# source line after it), torch's glog-style log lines ("W1203 10:27:41.344000 12451 file.py:630]"),
# the logging module's default format ("WARNING:name:"), torchao's import messages, tracebacks.
LIBRARY_WARNING = re.compile(r"\w*Warning\b|\bwarn(_once)?\(|^[WEF]\d{4} \d\d:\d\d:\d\d|^(WARNING|ERROR):|"
                             r"Failed to load |Skipping import of cpp extensions|deprecat|Traceback", re.IGNORECASE)
MICRO = ["--tiny", "--tiny-passages", "4", "--tiny-steps", "6", "--tiny-hidden", "32", "--tiny-layers", "2",
         "--tiny-general", "20", "--steps", "2", "--finetune-steps", "2", "--finetune-on", "mnli",
         "--fa-limit", "4", "--env-batch-size", "4", "--verbmem-tokens", "8", "--knowmem-tokens", "4"]


def screen_lines(text: str) -> list[str]:
    """What a terminal shows: progress bars redraw with carriage returns, so split on both."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def test_the_pattern_catches_what_the_libraries_print():
    seen = ["Failed to load /x/torchao/_C_mxfp8.so: Could not load this library: /x/torchao/_C_mxfp8.so",
            "W1203 10:27:41.344000 12451 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass",
            "/x/torch/_functorch/autograd_cache.py:675: UserWarning: OptimState8bit does not implement ...",
            "  warn_once(", "WARNING:root:something", "FutureWarning: `x` is deprecated"]
    ours = ["step 1/2 | forget  13.8629 | retain   6.8727 | irm 6.766e-02 | lr 5.0e-03 |  2051 ms",
            "original/finetune/mnli: 100%|██████████| 2/2 [00:03<00:00,  1.87s/it, loss=7.0858]",
            "unlearned: VerbMem 0.0 | KnowMem forget 0.0 | KnowMem retain 0.0 | PrivLeak 44.1 | VerbMem unseen 0.0"]
    assert all(LIBRARY_WARNING.search(s) for s in seen)
    assert not any(LIBRARY_WARNING.search(s) for s in ours)


def test_known_import_noise_is_dropped_and_nothing_else(caplog):
    import runlib

    caplog.set_level(logging.DEBUG)
    ao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    ao.warning("Failed to load %s: %s", "/x/_C_cutlass_90a.abi3.so", "Could not load this library")
    ao.warning("Skipping import of cpp extensions due to incompatible torch version.")
    pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.",
                   "<enum 'KernelPreference'>")
    ao.warning("some other torchao warning")                       # not the known noise: shown
    pytree.warning("another pytree message")
    logging.getLogger("transformers").warning("Failed to load the tokenizer")   # another logger: shown
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["some other torchao warning", "another pytree message", "Failed to load the tokenizer"]
    runlib.quiet_import_noise()                                       # idempotent: one filter per logger
    assert ao.filters.count(runlib.not_noise) == 1


@needs_data
def test_a_tiny_run_prints_no_library_warnings(tmp_path):
    """--low-memory 8bit imports torchao's optimizers, the source of most of the noise."""
    r = run_script("run_muse.py", ["--method", "npo", "--ilu-env", "gsm8k", "--data-dir", DATA, "--out",
                                   str(tmp_path / "run"), "--low-memory", "8bit", *MICRO], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    noise = [line for line in screen_lines(r.stdout + r.stderr) if LIBRARY_WARNING.search(line)]
    assert not noise, "\n".join(noise[:5])
    assert any(line.startswith("unlearned: VerbMem") for line in screen_lines(r.stdout))
