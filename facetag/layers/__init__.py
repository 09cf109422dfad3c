"""facetag.layers: every op with a hand-written backward pass.

One file per op family; each op ``Foo`` is ``FooFn`` (the autograd Function, forward and
backward side by side), ``foo()`` (the validating wrapper) and ``Foo`` (the nn.Module).
``FUNCTIONS`` lists every Function: a network built from these layers has no other
autograd node in its graph (tests/test_models.py walks it).
"""

import facetag.layers.activation as _activation
import facetag.layers.affine as _affine
import facetag.layers.conv as _conv
import facetag.layers.conv_affine as _conv_affine
import facetag.layers.dropout as _dropout
import facetag.layers.fused as _fused
import facetag.layers.linear as _linear
import facetag.layers.loss as _loss
import facetag.layers.margin as _margin
import facetag.layers.norm as _norm
import facetag.layers.normalize as _normalize
import facetag.layers.pool as _pool
import facetag.layers.residual as _residual
import facetag.layers.shape as _shape
from facetag.layers.activation import LeakyReLU, PReLU, ReLU, leaky_relu, prelu, relu
from facetag.layers.affine import ChannelAffine, channel_affine
from facetag.layers.conv import Conv2d, conv2d
from facetag.layers.conv_affine import conv_affine
from facetag.layers.dropout import Dropout, dropout
from facetag.layers.fused import BatchNormAct2d, batch_norm_act
from facetag.layers.linear import Linear, linear
from facetag.layers.loss import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    SmoothL1Loss,
    binary_cross_entropy_with_logits,
    cross_entropy,
    smooth_l1_loss,
)
from facetag.layers.margin import ArcMarginHead, arc_margin, cosine
from facetag.layers.norm import BatchNorm1d, BatchNorm2d, batch_norm
from facetag.layers.normalize import L2Norm, l2_normalize
from facetag.layers.pool import (
    AvgPool2d,
    GlobalAvgPool2d,
    MaxPool2d,
    avg_pool2d,
    global_avg_pool2d,
    max_pool2d,
)
from facetag.layers.residual import Add, ZeroPadAdd, add, zero_pad_add
from facetag.layers.shape import Flatten, flatten

FUNCTIONS = (
    *_activation.FUNCTIONS,
    *_affine.FUNCTIONS,
    *_conv.FUNCTIONS,
    *_conv_affine.FUNCTIONS,
    *_dropout.FUNCTIONS,
    *_fused.FUNCTIONS,
    *_linear.FUNCTIONS,
    *_loss.FUNCTIONS,
    *_margin.FUNCTIONS,
    *_norm.FUNCTIONS,
    *_normalize.FUNCTIONS,
    *_pool.FUNCTIONS,
    *_residual.FUNCTIONS,
    *_shape.FUNCTIONS,
)

__all__ = [
    "FUNCTIONS",
    "Add",
    "ArcMarginHead",
    "AvgPool2d",
    "BCEWithLogitsLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNormAct2d",
    "ChannelAffine",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2d",
    "L2Norm",
    "LeakyReLU",
    "Linear",
    "MaxPool2d",
    "PReLU",
    "ReLU",
    "SmoothL1Loss",
    "ZeroPadAdd",
    "add",
    "arc_margin",
    "avg_pool2d",
    "batch_norm",
    "batch_norm_act",
    "binary_cross_entropy_with_logits",
    "channel_affine",
    "conv2d",
    "conv_affine",
    "cosine",
    "cross_entropy",
    "dropout",
    "flatten",
    "global_avg_pool2d",
    "l2_normalize",
    "leaky_relu",
    "linear",
    "max_pool2d",
    "prelu",
    "relu",
    "smooth_l1_loss",
    "zero_pad_add",
]
