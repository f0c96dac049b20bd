"""The callbacks RagTrainer adds to ``Trainer``'s: run and epoch hooks, and logs printed as numbers."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


class RunHooks(TrainerCallback):
    """What RagTrainer does at the start and end of a run and of each epoch.

    Run start: speed metrics restart (they are per run, as ``Trainer``'s), NEFTune hooks the model being trained
    (again on every ``auto_find_batch_size`` retry). Epoch start: the train sampler's epoch is set. ``Trainer``
    does it too, but on a multi-rank resume accelerate's ``skip_first_batches`` wraps the
    ``BatchSamplerShard`` around our sampler in a ``SkipBatchSampler``, and neither forwards ``set_epoch``: the
    sampler would replay epoch 0's order (and, for per-epoch RAFT data, epoch 0's examples). ``state.epoch`` is
    ``epoch + steps done / steps per epoch``, so its integer part is the epoch about to run.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        t = self.trainer
        t._metrics.start_run()
        if t._neftune is not None:
            t._neftune.attach(t.accelerator.unwrap_model(model if model is not None else t.model))

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._train_sampler
        if sampler is not None:
            sampler.set_epoch(int(state.epoch or 0))

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer._neftune is not None:
            self.trainer._neftune.detach()


def shown(logs: dict, max_str_len: int | None = None) -> dict:
    """Logs as printed: floats as numbers of 4 significant digits (transformers prints them as quoted strings,
    ``'loss': '0.3918'``), long strings elided, ``total_flos`` left out."""
    shown = {}
    for k, v in logs.items():
        if isinstance(v, float):
            v = float(f"{v:.4g}")
        elif isinstance(v, str) and max_str_len is not None and len(v) > max_str_len:
            v = f"[String too long to display, length: {len(v)} > {max_str_len}]"
        shown[k] = v
    shown.pop("total_flos", None)
    return shown


class NumericProgressCallback(ProgressCallback):
    """Trainer's progress bar, with logged numbers printed as numbers (see :func:`shown`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(str(shown(logs, self.max_str_len)))


class NumericPrinterCallback(PrinterCallback):
    """What Trainer prints with ``disable_tqdm=True``, with logged numbers printed as numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(shown(logs))


def print_numbers(handler) -> None:
    """Swap ``Trainer``'s progress bar / printer in ``handler`` (a ``CallbackHandler``) for the ones above."""
    for i, cb in enumerate(handler.callbacks):
        if type(cb) is ProgressCallback:
            handler.callbacks[i] = NumericProgressCallback(max_str_len=cb.max_str_len)
        elif type(cb) is PrinterCallback:
            handler.callbacks[i] = NumericPrinterCallback()
