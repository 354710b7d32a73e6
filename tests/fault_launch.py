"""The launcher with a fault injected, for tests only: ``python tests/fault_launch.py --fault POINT:STEP
<repa-fast-train arguments>`` (also as the deepspeed launcher's script).

    save:N      die (os._exit, as a kill would) right after this rank wrote checkpoint N, before `latest`
    nan_loss:K  the loss of every step from K on is non-finite
"""

import os
import sys

import repa_fast.losses
import repa_fast.train


def inject(fault: str) -> None:
    point, _, at = fault.partition(":")
    at = int(at)
    if point == "save":
        write = repa_fast.train.write_checkpoint

        def write_then_die(engine, ckpt_dir, step, *args, **kwargs):
            tag = write(engine, ckpt_dir, step, *args, **kwargs)
            if step == at:
                sys.stderr.write(f"fault_launch: dying at save step {step}\n")
                sys.stderr.flush()
                os._exit(17)
            return tag

        repa_fast.train.write_checkpoint = write_then_die
    elif point == "nan_loss":
        call = repa_fast.losses.SD15Loss.__call__

        def nan_from(self, *args, step=None, **kwargs):
            losses = call(self, *args, step=step, **kwargs)
            if step is not None and step >= at:
                losses["loss"] = losses["loss"] * float("nan")
            return losses

        repa_fast.losses.SD15Loss.__call__ = nan_from
    else:
        raise SystemExit(f"fault_launch: unknown fault {fault!r} (save:N or nan_loss:K)")


if __name__ == "__main__":
    args = sys.argv[1:]  # the deepspeed launcher puts --local_rank=N first
    if "--fault" not in args[:-1]:
        raise SystemExit(__doc__)
    at = args.index("--fault")
    inject(args[at + 1])
    repa_fast.train.main(args[:at] + args[at + 2:])
