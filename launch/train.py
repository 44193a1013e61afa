r"""Train an autoencoder. The same command runs on one CPU, one GPU, many GPUs and many nodes:
only the accelerate config changes.

    # one process (CPU or one GPU)
    python launch/train.py --config launch/configs/demo.yaml run.dir=runs/demo
    # two CPU processes (gloo)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 launch/train.py \
        --config launch/configs/demo.yaml
    # 8 GPUs, DDP or DeepSpeed ZeRO
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml launch/train.py --config launch/configs/kl_f8.yaml
    # SLURM, many nodes, requeued on preemption
    sbatch launch/slurm/train.sbatch

Options: `--config FILE` (repeatable; later files override earlier ones), `key.sub=value` overrides,
`--resume latest|PATH`, `--help-config` (every key with its default and meaning).
Exit codes: 0 done, 1 training stopped (non-finite losses, too many bad samples, a checkpoint that could
not be written), 2 bad config or input (run.dir held by another job, a checkpoint that fails verification),
75 stopped by SIGTERM/SIGUSR1 after a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path


class StopWhileStarting(KeyboardInterrupt):
    """SIGTERM/SIGUSR1 (SLURM's stop or warning) before the training loop takes them over: raised where
    the process is, as Ctrl-C is, so it ends in one line with exit 75 (the job may run the same command
    again) instead of dying silently of the signal (143/138)."""


_IMPORTING = [True]  # the module's own imports: no try around them to catch the exception in


def _stop_while_starting(signum, frame):
    name = signal.Signals(signum).name
    if _IMPORTING[0]:
        if os.environ.get("RANK", "0") == "0":
            os.write(2, f"stopped by {name} while starting: nothing was trained or written\n".encode())
        _mark_early(name)
        os._exit(75)
    raise StopWhileStarting(name)


def _mark_early(name: str) -> None:
    """A stop before the config is read (the imports take seconds): rank 0 of a SLURM job still leaves
    harness.signals.mark_preempted's line, in the run folder of the command line's last run.dir= (which
    train.sbatch always passes, and creates), so that the job is requeued rather than ended as failed.
    Plain os calls: torch may be half imported."""
    job = os.environ.get("SLURM_JOB_ID")
    runs = [a.partition("=")[2] for a in sys.argv[1:] if a.startswith("run.dir=")]
    run = os.path.expanduser(runs[-1]) if runs else ""
    if not job or os.environ.get("RANK", "0") != "0" or not os.path.isdir(run):
        return
    tmp = os.path.join(run, f".preempted.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(f"{name}: nothing trained from this start (job {job})\n")
        os.replace(tmp, os.path.join(run, "preempted"))
    except OSError:
        pass


if __name__ == "__main__":  # first thing, before the heavy imports (in-process callers keep their own handlers)
    for _sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_sig, _stop_while_starting)
    if (_held := os.environ.get("HARNESS_CRASH_TEST_PAUSE", "")).startswith("importing:"):
        import time  # signal tests hold here: the handler is in, the heavy imports are not

        time.sleep(float(_held.partition(":")[2]))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harness.checkpoint import CheckpointError, ResumeError  # noqa: E402
from harness.config import ConfigError, describe, load_config  # noqa: E402
from harness.dist import DistEnvError  # noqa: E402
from harness.runlock import RunDirError, holds, release_all  # noqa: E402
from shards.sources import DataSourceError  # noqa: E402

USER_ERRORS = (ConfigError, DataSourceError, ResumeError, DistEnvError, RunDirError)
_IMPORTING[0] = False


class _Once(argparse.Action):
    """An option that may be given once: a second --resume used to win silently (the other set aside)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give one")
        setattr(namespace, self.dest, values)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    p.add_argument("--resume", default=None, metavar="latest|PATH", action=_Once,
                   help="continue from the newest or a given checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_intermixed_args(argv)  # overrides may come before or after --resume / --config


def _say(msg: str) -> None:
    """User errors are printed once (by rank 0), as one line, without a traceback."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


# `accelerate launch launch/train.py --multi_gpu ...`: options of the launcher written after the
# script name reach us, not accelerate. Flags that take a value, and those that do not.
_LAUNCHER_VALUED = {"--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                    "--main_process_port", "--mixed_precision", "--config_file", "--zero_stage", "--gpu_ids",
                    "--deepspeed_config_file"}
_LAUNCHER_FLAGS = {"--multi_gpu", "--cpu", "--use_deepspeed", "--use_fsdp"}


def split_launcher_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, misplaced `accelerate launch` options)."""
    ours, theirs, take_value = [], [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if take_value:
            theirs.append(arg)
            take_value = False
        elif name in _LAUNCHER_FLAGS or name in _LAUNCHER_VALUED:
            theirs.append(arg)
            take_value = name in _LAUNCHER_VALUED and "=" not in arg
        else:
            ours.append(arg)
    return ours, theirs


def _can_relaunch(launcher: list[str]) -> bool:
    """Whether the misplaced launcher options say enough to start the intended run ourselves: a GPU
    machine (--multi_gpu takes every GPU), or a process count on CPU. Never twice."""
    import torch

    if os.environ.get("HARNESS_RELAUNCHED") or os.environ.get("HARNESS_NO_RELAUNCH"):
        return False
    named = {a.split("=", 1)[0] for a in launcher}
    return torch.cuda.is_available() or "--num_processes" in named


def _relaunch(launcher: list[str], argv: list[str]) -> None:
    """`accelerate launch launch/train.py --multi_gpu ...` (the user's own spelling): start the
    multi-process run it means, `accelerate launch --multi_gpu ... launch/train.py ...`, in place of
    this process (exec: the outer launcher waits for the new one and gets its exit code)."""
    import torch

    env = dict(os.environ, HARNESS_RELAUNCHED="1")
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # MULTI_CPU with gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(Path(__file__).resolve()), *argv]
    _say(f"note: accelerate options after the script name; running: accelerate launch {' '.join(launcher)} "
         f"launch/train.py {' '.join(argv)}")
    os.execve(sys.executable, cmd, env)


def _find_deepspeed_config() -> str | None:
    """launch/accelerate/zero*.yaml name their DeepSpeed JSON relative to the checkout, and accelerate
    reads it relative to the working directory: launched from elsewhere, take the checkout's. A file
    found in neither place is one line (accelerate's own error is a chain of three tracebacks)."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not name or name == "none" or os.path.isfile(name):
        return None
    ours = Path(__file__).resolve().parents[1] / name
    if not os.path.isabs(name) and ours.is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ours)
        return None
    return (f"deepspeed_config_file {name} (from the accelerate config): no such file, neither in the working "
            "directory nor in the checkout")


def main(argv: list[str] | None = None) -> int:
    argv, launcher = split_launcher_options(sys.argv[1:] if argv is None else list(argv))
    if launcher:
        rest = " ".join(shlex.quote(a) for a in argv) or "..."  # the whole command, ready to paste
        where = (f"`{' '.join(launcher)}` belongs to `accelerate launch`, before the script name: "
                 f"accelerate launch {' '.join(launcher)} launch/train.py {rest}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # already distributed: what was meant happened
            _say(f"note: {where} (ignored here: this run already has {os.environ['WORLD_SIZE']} processes)")
        elif _can_relaunch(launcher):
            _relaunch(launcher, argv)  # does not return
        else:
            import torch

            if not torch.cuda.is_available():  # accelerate needs a process count on CPU, or it fails itself
                where = (f"`{' '.join(launcher)}` belongs to `accelerate launch`, before the script name, and on "
                         f"CPU with a process count: ACCELERATE_USE_CPU=1 accelerate launch {' '.join(launcher)} "
                         f"--num_processes 2 launch/train.py {rest}")
            _say(f"error: {where} (or pick a config: --config_file launch/accelerate/cpu2.yaml, multi_gpu.yaml)")
            return 2
    args = parse_args(argv)
    if args.help_config:
        try:
            print("\n".join(describe()))
            sys.stdout.flush()  # a reader that went away (`| head`) is found here, not at the interpreter's exit
        except BrokenPipeError:  # quietly, as `cat` does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE
        return 0
    if (problem := _find_deepspeed_config()) is not None:
        _say(f"error: {problem}")
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        _say(f"config error: {e}")
        return 2

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would warn on every rank that it guessed
    from harness.inference import LoadError  # heavy imports after the config is known good
    from harness.trainer import Trainer, TrainingError

    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume)
        return trainer.train()
    except (*USER_ERRORS, LoadError) as e:
        _say(f"error: {e}")
        return 2
    except TrainingError as e:
        _say(f"training stopped: {e}")
        return 1
    except CheckpointError as e:  # a save failed (disk full): the message says which checkpoint is intact
        _say(f"error: {e}")
        return 1
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is one; other RuntimeErrors are bugs, raised on
        from harness.inference import out_of_memory

        if (oom := out_of_memory(e)) is None:
            raise
        _say(f"error: {oom}: a smaller train.batch_size, data.image_size or model needs less (the checkpoints "
             "saved before are intact)")
        return 1
    except OSError as e:  # storage failing outside a save (config.yaml at start, a full disk), too many open files
        where = f" ({e.filename})" if e.filename else ""
        loading = e.filename is not None and "checkpoints" in Path(str(e.filename)).parts
        _say(f"error: {type(e).__name__}: {e.strerror or e}{where}; the checkpoints saved before are intact "
             + ("(that file is one a checkpoint was expected to hold)" if loading
                else "(--resume latest continues from the newest)"))
        return 1
    except StopWhileStarting as e:
        if trainer is not None and trainer.exit_code is not None:  # it came as the finished run was closing
            return trainer.exit_code
        _say(f"stopped by {e} while starting: nothing trained from this start (the checkpoints saved before are "
             "intact)")
        # the sbatch script requeues on it (accelerate turns 75 into 1): written by the run's lock holder, or
        # before the lock by rank 0 of a SLURM job (the mark names the job; its script reads only its own)
        if holds(cfg.run.dir) or (os.environ.get("SLURM_JOB_ID") and os.environ.get("RANK", "0") == "0"):
            from harness.signals import mark_preempted

            mark_preempted(cfg.run.dir, None, getattr(signal.Signals, str(e), None))
        return 75
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints), or one before the loop
        _say("interrupted: stopped without a checkpoint of this step; the saved ones are intact "
             "(--resume latest continues from the newest)")
        return 130
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # from here a stop signal ends the process as it would
            if signal.getsignal(sig) is _stop_while_starting:
                signal.signal(sig, signal.SIG_DFL)
        if trainer is not None:
            trainer.log.close()
        release_all()  # the run folder's lock (the kernel drops it at exit anyway; tests call main() twice)
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main()
    except StopWhileStarting as e:  # imports, the config: nothing written yet
        _say(f"stopped by {e} while starting: nothing was trained or written")
        _mark_early(str(e))
        code = 75
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, the config): nothing written yet
        _say("interrupted while starting: nothing was trained or written")
        code = 130
    # Everything the run writes is closed, fsynced and renamed by now, and the process group is
    # gone. Skip the interpreter's C++ teardown: under DeepSpeed + gloo it once aborted a finished
    # rank at exit ("terminate called without an active exception", SIGABRT), which turned a
    # complete run into a failed job under the launcher.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
