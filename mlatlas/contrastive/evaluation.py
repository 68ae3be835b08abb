"""Evaluation of a joint image-text space: zero-shot classification, retrieval, linear probe.

Any model with ``encode_image(images)`` and ``encode_text(ids, mask)`` returning L2-normalised
embeddings can be scored (CLIP, SigLIP, LiT, BLIP's contrastive heads).

- Zero-shot classification (Radford et al. 2021, section 3.1.4) with a prompt ensemble: class c
  is embedded as the renormalised mean over templates p of encode_text(p.format(c)), and an image
  takes the class of highest cosine similarity. No label is used for training.
- Retrieval: image-to-text and text-to-image recall@1/5/10 on the test split, a caption being a
  positive for every image whose content it describes.
- Linear probe: logistic regression on the frozen image-tower features (before projection).
"""

from __future__ import annotations

import torch

from mlatlas.contrastive.common import encode_batched
from mlatlas.contrastive.data import CaptionedData, CaptionedSplit
from mlatlas.contrastive.text import CaptionTokenizer
from mlatlas.core.plots import plt, show_images
from mlatlas.eval.metrics import linear_probe_accuracy, recall_at_k

PROBE_TRAIN = 5000


@torch.no_grad()
def embed_texts(model, tokenizer: CaptionTokenizer, texts: list[str]) -> torch.Tensor:
    return encode_batched(model.encode_text, *tokenizer.encode(texts))


@torch.no_grad()
def class_embeddings(model, tokenizer: CaptionTokenizer, class_names: tuple[str, ...],
                     prompts: tuple[str, ...]) -> torch.Tensor:
    """(C, D) prompt-ensemble embeddings: the mean over templates, renormalised."""
    texts = [p.format(c) for c in class_names for p in prompts]
    per_prompt = embed_texts(model, tokenizer, texts).view(len(class_names), len(prompts), -1)
    return torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)


def zero_shot_predictions(image_embeddings: torch.Tensor,
                          class_embeddings: torch.Tensor) -> torch.Tensor:
    return (image_embeddings @ class_embeddings.T).argmax(dim=1)


def retrieval(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
              split: CaptionedSplit) -> dict[str, float]:
    """Image-to-text and text-to-image recall@1/5/10 of a split's pairs."""
    similarity = image_embeddings @ text_embeddings.T
    positives = split.keys[:, None] == split.keys[None, :]
    i2t, t2i = recall_at_k(similarity, positives), recall_at_k(similarity.T, positives.T)
    return {**{f"i2t_recall@{k}": v for k, v in i2t.items()},
            **{f"t2i_recall@{k}": v for k, v in t2i.items()}}


@torch.no_grad()
def evaluate_joint_space(model, tokenizer: CaptionTokenizer, data: CaptionedData,
                         probe: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Zero-shot top-1 accuracy ``zero_shot_top1`` (and its chance level), retrieval recall and
    linear-probe accuracy of ``data``'s zero-shot and test splits (the probe trains on the first
    ``PROBE_TRAIN`` training images); also the tensors the figures draw. Deterministic."""
    model.eval()
    classes = class_embeddings(model, tokenizer, data.class_names, data.prompts)
    zs_images = encode_batched(model.encode_image, data.zero_shot.images)
    predictions = zero_shot_predictions(zs_images, classes)
    test_images = encode_batched(model.encode_image, data.test.images)
    test_texts = embed_texts(model, tokenizer, data.test.captions)
    scores = {"zero_shot_top1": float((predictions == data.zero_shot.labels).float().mean()),
              "zero_shot_chance": 1 / len(data.class_names),
              **retrieval(test_images, test_texts, data.test)}
    if probe:
        train = data.train.images[:PROBE_TRAIN]
        scores["linear_probe_accuracy"] = linear_probe_accuracy(
            encode_batched(model.image_tower, train), data.train.labels[:PROBE_TRAIN],
            encode_batched(model.image_tower, data.test.images), data.test.labels)
    model.train()
    return scores, {"predictions": predictions, "test_images": test_images,
                    "test_texts": test_texts}


def save_joint_space_figures(run, data: CaptionedData, scores: dict[str, float],
                             tensors: dict[str, torch.Tensor]) -> None:
    """``zero_shot.png`` and ``retrieval.png`` of ``evaluate_joint_space``'s results."""
    run.save_figure(zero_shot_figure(data, tensors["predictions"], f"{run.method}: zero-shot "
                                     f"accuracy {scores['zero_shot_top1']:.1%}"),
                    "zero_shot.png")
    run.save_figure(retrieval_figure(data.test, tensors["test_images"], tensors["test_texts"],
                                     title=f"{run.method}: image-to-text retrieval (test)"),
                    "retrieval.png")


def zero_shot_figure(data: CaptionedData, predictions: torch.Tensor, title: str = ""):
    """Confusion matrix of zero-shot predictions over the classes present in the split."""
    labels = data.zero_shot.labels
    present = labels.unique()
    confusion = torch.zeros(len(present), len(data.class_names))
    for row, c in enumerate(present.tolist()):
        confusion[row] = torch.bincount(predictions[labels == c],
                                        minlength=len(data.class_names)).float()
    confusion /= confusion.sum(1, keepdim=True)
    fig, ax = plt.subplots(figsize=(0.32 * len(data.class_names) + 2, 0.32 * len(present) + 1.5))
    ax.imshow(confusion, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(data.class_names)), data.class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(present)), [data.class_names[c] for c in present.tolist()],
                  fontsize=7)
    ax.set_xlabel("predicted (prompt ensemble)")
    ax.set_ylabel("true class")
    ax.set_title(title or "zero-shot predictions")
    return fig


def retrieval_figure(split: CaptionedSplit, image_embeddings: torch.Tensor,
                     text_embeddings: torch.Tensor, n: int = 6, k: int = 3, title: str = ""):
    """The first ``n`` test images, each with its ``k`` best captions (green when right)."""
    top = (image_embeddings[:n] @ text_embeddings.T).topk(k, dim=1).indices
    fig, axes = plt.subplots(n, 2, figsize=(7, 1.2 * n),
                             gridspec_kw={"width_ratios": [1, 5]})
    for i in range(n):
        show_images(axes[i, 0], split.images[i:i + 1], ncols=1)
        axes[i, 1].axis("off")
        for rank, j in enumerate(top[i].tolist()):
            right = bool(split.keys[i] == split.keys[j])
            axes[i, 1].text(0, 0.8 - 0.3 * rank, f"{rank + 1}. {split.captions[j]}",
                            color="green" if right else "red", fontsize=8,
                            transform=axes[i, 1].transAxes)
    fig.suptitle(title or "image-to-text retrieval (test)")
    return fig
