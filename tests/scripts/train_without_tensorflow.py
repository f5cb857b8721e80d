"""Trains the fixed-point ResNet-20 on synthetic data with TensorFlow unimportable, as on a
GPU image without it, and prints the result and the files of the workdir as JSON.

    python tests/scripts/train_without_tensorflow.py WORKDIR
"""

import json
import os
import sys

sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError

from f8net_jax.configs import default  # noqa: E402
from f8net_jax import train  # noqa: E402


def main(workdir):
    config = default.get_config()
    config.image_size, config.channels, config.batch_size = 8, 1, 16
    config.synthetic_train_size, config.synthetic_eval_size = 64, 16
    config.num_epochs, config.log_every_steps = 1, 2
    result = train.train_and_evaluate(config, workdir)
    print(json.dumps({"result": result, "files": sorted(os.listdir(workdir))}))


if __name__ == "__main__":
    main(sys.argv[1])
