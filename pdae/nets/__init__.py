"""Networks: the baseline UNet builder, the frozen backbone adapter, encoder E, gradient estimator G and PDAE."""

from pdae.nets.backbone import Backbone, Features, UpBlockPlan, UpPathPlan, load_backbone
from pdae.nets.encoder import Encoder, LabelEncoder
from pdae.nets.gradient import GradientEstimator, ZResBlock
from pdae.nets.pdae import PDAE, ModelFn, load_pdae, save_pdae
from pdae.nets.unet import build_unet

__all__ = [
    "PDAE",
    "Backbone",
    "Encoder",
    "Features",
    "GradientEstimator",
    "LabelEncoder",
    "ModelFn",
    "UpBlockPlan",
    "UpPathPlan",
    "ZResBlock",
    "build_unet",
    "load_backbone",
    "load_pdae",
    "save_pdae",
]
