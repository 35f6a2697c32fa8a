import json
import os

from organisms import records


def build(dataset, data_dir):
    made = records(seed=7)
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump({"train": made[:120], "validation": made[120:]}, fh)
