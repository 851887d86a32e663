"""Run a runner as a GPU user would, without the hub: datasets.load_dataset is the fake hub of
tests/fake_hub.py holding mini_hub()'s rows (each data set's published schema).

    python tests/hub_run.py run_wmdp.py --method npo --ilu-env gsm8k --model FOLDER --out OUT ...
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import datasets  # noqa: E402

from fake_hub import FakeHub, mini_hub  # noqa: E402

datasets.load_dataset = FakeHub(mini_hub())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
