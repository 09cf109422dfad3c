"""The cascade's training losses and patch augmentation (facetag train-detector).

Per patch, as MTCNN: a face/no-face BCE on every labelled patch (part faces are neither),
smooth L1 on the 4 box offsets of positives and part faces, and, for the ONet, smooth L1
on the 10 landmark coordinates of patches whose face has teacher landmarks:

    loss = face + box_weight * box / n_box + landmark_weight * marks / n_marks

Online hard-example mining (MTCNN keeps the 70% largest face losses of each batch):
``ohem`` < 1 weights only the top ``ohem`` share of the labelled patches' face losses,
chosen on the detached losses, so easy negatives stop diluting the gradient.

The masks ride in the BCE weights and in targets equal to the prediction (zero loss, zero
gradient) for patches without a box or landmarks, so the graph holds only facetag ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from facetag.data.patches import PART, POS, POS_NO_BOX, PatchSet
from facetag.layers.loss import binary_cross_entropy_with_logits, smooth_l1_loss
from facetag.models.detector import (
    StageNet,
    mirror_landmarks,
    mirror_offsets,
    normalize_patches,
)


@dataclass
class StageLoss:
    face: Tensor  # () BCE, weighted mean over the (mined) labelled patches
    box: Tensor  # () smooth L1 summed over the box patches
    n_box: int
    marks: Tensor | None  # () smooth L1 summed over the landmark patches (ONet only)
    n_marks: int
    logits: Tensor  # (N,) detached face logits

    def roots(self, box_weight: float, landmark_weight: float) -> tuple[list[Tensor], list[Tensor]]:
        """The losses to backpropagate and each one's incoming gradient (its weight): no
        sum node, so the graph holds only our ops."""
        one = torch.ones((), device=self.face.device)
        roots, grads = [self.face, self.box], [one, one * (box_weight / max(self.n_box, 1))]
        if self.marks is not None and self.n_marks:
            roots.append(self.marks)
            grads.append(one * (landmark_weight / self.n_marks))
        return roots, grads

    def total(self, box_weight: float, landmark_weight: float) -> float:
        value = float(self.face.detach()) + box_weight * float(self.box.detach()) / max(
            self.n_box, 1
        )
        if self.marks is not None and self.n_marks:
            value += landmark_weight * float(self.marks.detach()) / self.n_marks
        return value


def detector_losses(
    net: StageNet,
    x: Tensor,
    labels: Tensor,
    offsets: Tensor,
    marks: Tensor | None = None,
    ohem: float = 1.0,
    landmark_beta: float = 1.0,
) -> StageLoss:
    """The losses of one batch: x (N, 3, S, S) normalised, labels (N,), offsets (N, 4),
    landmark targets (N, 10) with NaN where unknown (None: none at all). ``landmark_beta``
    is smooth L1's beta on the landmarks: errors are ~0.05 of the window, where beta = 1
    gives gradients of ~0.05 per coordinate and a small beta gives L1's 1."""
    N = x.shape[0]
    logit, box, lm = net.outputs(x)  # (N, 1, 1, 1), (N, 4, 1, 1), (N, 10, 1, 1) or None
    is_face = (labels == POS) | (labels == POS_NO_BOX)
    has_label = labels != PART
    face_target = is_face.float().view(N, 1, 1, 1)
    weight = _face_weights(logit.detach().view(N), is_face, has_label, ohem)
    face_loss = binary_cross_entropy_with_logits(
        logit, face_target, weight=weight.view(N, 1, 1, 1), reduction="sum"
    )
    has_box = ((labels == POS) | (labels == PART)).view(N, 1, 1, 1)
    box_target = torch.where(has_box, offsets.view(N, 4, 1, 1), box.detach())
    box_loss = smooth_l1_loss(box, box_target, beta=1.0, reduction="sum")
    marks_loss, n_marks = None, 0
    if lm is not None and marks is not None:
        has_marks = ~torch.isnan(marks).any(dim=1)  # (N,)
        n_marks = int(has_marks.sum())
        target = torch.where(
            has_marks.view(N, 1, 1, 1), marks.nan_to_num().view(N, 10, 1, 1), lm.detach()
        )
        marks_loss = smooth_l1_loss(lm, target, beta=landmark_beta, reduction="sum")
    return StageLoss(
        face_loss, box_loss, int(has_box.sum()), marks_loss, n_marks, logit.detach().view(N)
    )


def _face_weights(logit: Tensor, is_face: Tensor, has_label: Tensor, ohem: float) -> Tensor:
    """(N,) BCE weights: 1/k for the k labelled patches kept, the ``ohem`` share with the
    largest losses (all of them for ohem = 1), 0 for the rest."""
    n = int(has_label.sum())
    if n == 0:
        return torch.zeros_like(logit)
    keep = has_label
    if ohem < 1.0:
        with torch.no_grad():  # which patches count is a choice, not part of the maths
            y = is_face.float()  # BCE per patch: max(l, 0) - l * y + log(1 + e^-|l|)
            each = logit.clamp(min=0) - logit * y + torch.log1p(torch.exp(-logit.abs()))
            each = torch.where(has_label, each, torch.full_like(each, -math.inf))
            k = max(1, math.ceil(ohem * n))
            keep = torch.zeros_like(has_label)
            keep[each.topk(k).indices] = True
    return keep.float() / int(keep.sum())


def augment(
    x: Tensor, offsets: Tensor, g: torch.Generator, marks: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Random horizontal flip (offsets and landmarks mirrored) and brightness/contrast jitter.

    x (N, 3, S, S) float 0..255, offsets (N, 4), marks (N, 10) -> the same shapes.
    """
    N = x.shape[0]
    flip = torch.rand(N, generator=g) < 0.5
    x = torch.where(flip.view(N, 1, 1, 1), x.flip(3), x)
    offsets = torch.where(flip.view(N, 1), mirror_offsets(offsets), offsets)
    if marks is not None:
        marks = torch.where(flip.view(N, 1), mirror_landmarks(marks), marks)
    contrast = torch.empty(N, 1, 1, 1).uniform_(0.7, 1.3, generator=g)
    brightness = torch.empty(N, 1, 1, 1).uniform_(-25, 25, generator=g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp(0, 255)
    grey = torch.rand(N, generator=g) < 0.1
    x = torch.where(grey.view(N, 1, 1, 1), x.mean(dim=1, keepdim=True).expand_as(x), x)
    return x, offsets, marks


@torch.no_grad()
def patch_loss(
    net: StageNet, patches: PatchSet, box_weight: float, landmark_weight: float, device: str
) -> float:
    """Mean loss of ``net`` on ``patches`` in eval mode (no mining): the validation loss."""
    net.eval()
    face_sum = box_sum = marks_sum = 0.0
    n = n_box = n_marks = 0
    for i in range(0, len(patches), 1024):
        part = patches.subset(torch.arange(i, min(i + 1024, len(patches))))
        x = normalize_patches(part.images.to(device))
        labels = part.labels.to(device)
        loss = detector_losses(net, x, labels, part.offsets.to(device), part.marks.to(device))
        k = int((labels != PART).sum())
        face_sum += float(loss.face) * k
        n += k
        box_sum += float(loss.box)
        n_box += loss.n_box
        if loss.marks is not None:
            marks_sum += float(loss.marks)
            n_marks += loss.n_marks
    value = face_sum / max(n, 1) + box_weight * box_sum / max(n_box, 1)
    return value + landmark_weight * marks_sum / max(n_marks, 1)


@torch.no_grad()
def landmark_error(net: StageNet, patches: PatchSet, device: str) -> float:
    """Mean distance between predicted and teacher landmarks over the patches that have
    them, in units of each face's eye distance (the measure of the landmark target; NaN
    when no patch has landmarks or the net has no landmark head)."""
    net.eval()
    total, n = 0.0, 0
    for i in range(0, len(patches), 1024):
        part = patches.subset(torch.arange(i, min(i + 1024, len(patches))))
        keep = ~torch.isnan(part.marks).any(dim=1)
        if not keep.any():
            continue
        _, _, lm = net.outputs(normalize_patches(part.images[keep].to(device)))
        if lm is None:
            return math.nan
        pred = lm[:, :, 0, 0].cpu().view(-1, 5, 2)
        true = part.marks[keep].view(-1, 5, 2)
        eyes = (true[:, 1] - true[:, 0]).norm(dim=1).clamp(min=1e-6)  # (k,)
        total += float(((pred - true).norm(dim=2).mean(dim=1) / eyes).sum())
        n += int(keep.sum())
    return total / n if n else math.nan
