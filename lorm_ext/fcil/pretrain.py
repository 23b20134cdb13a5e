"""``python -m lorm_ext.fcil.pretrain [OUT]``: pretrains the embedded backbone (``model.pretrain_on_digits``)
into OUT, by default the packaged file ``model.EMBEDDED_WEIGHTS``, under the CPU settings of ``lorm-fcil``
(``environment.CPU_ENVIRONMENT``) and one thread, and prints its sha256 next to the committed one."""

from __future__ import annotations

import argparse
import sys

from .environment import reexec_with_cpu_environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorm_ext.fcil.pretrain", description=__doc__)
    parser.add_argument("out", nargs="?", default=None, help="default: the packaged digits-vit file")
    args = parser.parse_args(argv)
    import torch

    from .environment import file_sha256, pin_cpu_kernels
    from .model import EMBEDDED_SHA256, EMBEDDED_WEIGHTS, pretrain_on_digits

    out = args.out or EMBEDDED_WEIGHTS
    torch.set_num_threads(1)
    pin_cpu_kernels()
    pretrain_on_digits(out)
    print(f"{out}: sha256 {file_sha256(out)} (the committed digits-vit: {EMBEDDED_SHA256})")
    return 0


if __name__ == "__main__":
    reexec_with_cpu_environment("lorm_ext.fcil.pretrain")
    sys.exit(main())
