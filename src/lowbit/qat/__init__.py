"""Quantization-aware training: learnable fake quantizers (LSQ / LSQ+), simulated BatchNorm folding,
observer → parameter hand-over, freeze schedules, distillation, the seed's three-phase learning-rate
schedule, checkpoints, and ``DistributedDataParallel`` support.

Python API::

    from lowbit import qat
    teacher = copy.deepcopy(model).eval()
    qmodel = qat.prepare_qat_(model, recipe, example, from_ptq=True, calib_data=calib)  # starts at PTQ
    opt = torch.optim.AdamW(qat.param_groups(qmodel, weight_decay=1e-4), lr=1e-3)
    sched = qat.ThreePhaseSchedule(total_steps).scheduler(opt)
    ...your loop: loss = cross_entropy(qmodel(x), y) or qat.kl_distill_loss(qmodel(x), teacher(x))...
    qat.convert_(qmodel)            # the same kind of model as lowbit.convert_ after PTQ
    lowbit.export_onnx(qmodel, example, "model_int8.onnx")

or ``qat.train_qat(qmodel, inputs, labels, config=qat.TrainConfig(epochs=5))`` for data held in tensors.
"""

from lowbit.qat.config import QATConfig
from lowbit.qat.distill import distill_loss, kl_distill_loss, mse_distill_loss
from lowbit.qat.layers import QATConv1d, QATConv2d, QATConvTranspose2d, QATLayerMixin, QATLinear
from lowbit.qat.prepare import calibrate_qat_, convert_, prepare_qat_
from lowbit.qat.quantizer import LearnableQuantizer, qparam_shape
from lowbit.qat.schedule import ThreePhaseSchedule
from lowbit.qat.sync import wrap_ddp
from lowbit.qat.train import (
    EpochLog,
    TrainConfig,
    TrainState,
    load_checkpoint,
    make_train_state,
    param_groups,
    save_checkpoint,
    train_qat,
)

__all__ = [
    "EpochLog", "LearnableQuantizer", "QATConfig", "QATConv1d", "QATConv2d", "QATConvTranspose2d", "QATLayerMixin",
    "QATLinear", "ThreePhaseSchedule", "TrainConfig", "TrainState", "calibrate_qat_", "convert_", "distill_loss",
    "kl_distill_loss", "load_checkpoint", "make_train_state", "mse_distill_loss", "param_groups", "prepare_qat_",
    "qparam_shape", "save_checkpoint", "train_qat", "wrap_ddp",
]
