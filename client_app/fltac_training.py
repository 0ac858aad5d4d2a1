"""Local training and evaluation of one adapter on one client's data.

Classification heads are shared-width (see ``fedspecialists.models.lora``): an example of a task
with C labels only sees the first C logits; the others are masked out of its loss and its
prediction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from client_app.training import local_batch_size, make_optimizer, steps_per_round
from fedspecialists.config import TrainSettings
from fedspecialists.models.lora import AdapterModel

if TYPE_CHECKING:  # the data-loading stack is imported only where examples are built
    from fedspecialists.data.tasks import ClientTask

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Model-ready examples of one or more tasks.

    ``inputs`` holds one dict per example (token ids, or ``pixel_values`` of shape ``(3, H, W)``);
    ``labels`` is ``(N,)`` for classification; ``num_labels`` ``(N,)`` is each example's own label
    count; ``tasks`` names each example's task.
    """

    inputs: list[dict[str, Any]]
    labels: torch.Tensor
    num_labels: torch.Tensor
    tasks: list[str]
    kind: str
    pad_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)


def encode(task: ClientTask, split: str, preprocessor: Any, max_length: int) -> Encoded:
    """Tokenise (or preprocess) one task's ``train`` or ``test`` examples once."""
    data = task.train if split == "train" else task.test
    n = len(data)
    if task.kind == "text_classification":
        pairs = data["text_pair"] if "text_pair" in data.column_names else None
        # A task with no example in this split (a small share of its test data) is empty:
        # tokenizers refuse an empty batch.
        tok = (
            preprocessor(
                list(data["text"]), pairs, truncation=True, max_length=max_length, padding=False
            )
            if n
            else {}
        )
        inputs = [{key: tok[key][i] for key in tok} for i in range(n)]
        labels = torch.tensor(list(data["label"]), dtype=torch.long)
    elif task.kind == "image_classification":
        images = [image.convert("RGB") for image in data["image"]]
        pixels = preprocessor(images=images, return_tensors="pt")["pixel_values"] if n else []
        inputs = [{"pixel_values": pixels[i]} for i in range(n)]
        labels = torch.tensor(list(data["label"]), dtype=torch.long)
    else:  # causal_lm: loss and accuracy on the response tokens only
        inputs = []
        for prompt, response in zip(data["prompt"], data["response"], strict=True):
            p_ids = preprocessor(prompt, add_special_tokens=True)["input_ids"]
            r_ids = preprocessor(response, add_special_tokens=False)["input_ids"]
            eos = [preprocessor.eos_token_id] if preprocessor.eos_token_id is not None else []
            ids = (p_ids + r_ids + eos)[:max_length]
            lab = ([IGNORE_INDEX] * len(p_ids) + r_ids + eos)[:max_length]
            inputs.append({"input_ids": ids, "labels": lab})
        labels = torch.zeros(n, dtype=torch.long)
    pad = getattr(preprocessor, "pad_token_id", 0) or 0
    return Encoded(
        inputs=inputs,
        labels=labels,
        num_labels=torch.full((n,), task.num_labels, dtype=torch.long),
        tasks=[task.name] * n,
        kind=task.kind,
        pad_token_id=int(pad),
    )


def concat(parts: Sequence[Encoded]) -> Encoded:
    """Several tasks' examples as one set (FedIT's shared adapter trains on all of them)."""
    return Encoded(
        inputs=[x for p in parts for x in p.inputs],
        labels=torch.cat([p.labels for p in parts]),
        num_labels=torch.cat([p.num_labels for p in parts]),
        tasks=[t for p in parts for t in p.tasks],
        kind=parts[0].kind,
        pad_token_id=parts[0].pad_token_id,
    )


def collate(enc: Encoded, index: Sequence[int]) -> dict[str, torch.Tensor]:
    """A padded batch of examples ``index`` (dynamic padding to the longest in the batch)."""
    rows = [enc.inputs[i] for i in index]
    if enc.kind == "image_classification":
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    longest = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        fill = {"input_ids": enc.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
        batch[key] = torch.tensor([list(r[key]) + [fill] * (longest - len(r[key])) for r in rows])
    batch["attention_mask"] = torch.tensor(
        [[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in rows]
    )
    return batch


def masked_logits(logits: torch.Tensor, num_labels: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, C_max)`` with the columns ``>= num_labels[b]`` of row b pushed to -1e9."""
    columns = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    return logits.masked_fill(columns >= num_labels[:, None], -1e9)


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` shuffled mini-batches, reshuffling at each pass over the data."""
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n and pos > 0:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def logits_device(out: object) -> torch.device:
    return out.logits.device  # type: ignore[attr-defined,no-any-return]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_loss(model: torch.nn.Module, enc: Encoded, index: np.ndarray) -> torch.Tensor:
    device = _device(model)
    batch = {k: v.to(device) for k, v in collate(enc, index.tolist()).items()}
    if enc.kind == "causal_lm":
        return model(**batch).loss
    logits = model(**batch).logits
    return F.cross_entropy(
        masked_logits(logits, enc.num_labels[index].to(device)), enc.labels[index].to(device)
    )


def train_adapter(
    adapters: AdapterModel, name: str, enc: Encoded, train_cfg: TrainSettings, seed: int
) -> tuple[float, int]:
    """Train adapter ``name`` on ``enc`` for ``train_cfg.local_epochs`` epochs (or ``local_steps``).

    Returns
    -------
    tuple[float, int]
        Mean training loss and the number of optimisation steps.
    """
    if len(enc) == 0:
        return 0.0, 0
    params = adapters.activate(name)
    model = adapters.model
    model.train()
    optimizer = make_optimizer(params, train_cfg)
    batch_size = local_batch_size(train_cfg, len(enc))
    steps = steps_per_round(train_cfg, len(enc))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    total = 0.0
    for index in _batches(len(enc), batch_size, steps, rng):
        loss = batch_loss(model, enc, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    model.eval()
    return total / steps, steps


def _head(model: torch.nn.Module, head_module: str) -> torch.nn.Module:
    """The outermost module named ``head_module`` (peft's wrapper of a saved head, if any)."""
    for name, module in model.named_modules():
        if name == head_module or name.endswith(f".{head_module}"):
            return module
    raise ValueError(f"model has no module named '{head_module}'")


@torch.no_grad()
def input_representations(
    adapters: AdapterModel, enc: Encoded, batch_size: int, head_module: str
) -> np.ndarray:
    """What the head receives for each of ``enc``'s inputs under the frozen base model.

    The representation is the head's input (pooled text or image features) with every adapter
    switched off, so it is the same function on every client and in every round. For a causal
    LM the head sees every token: their mean over real tokens is taken first.

    Returns
    -------
    np.ndarray
        ``(N, H)`` float32, H = the head's input width; ``(0, H)`` for an empty set.
    """
    model = adapters.model
    head = _head(model, head_module)
    seen: list[torch.Tensor] = []
    batch: dict[str, torch.Tensor] = {}

    def capture(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        if x.ndim == 3:  # (B, T, H): mean over the batch's real tokens
            mask = batch["attention_mask"].to(x.device).unsqueeze(-1).float()
            x = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        seen.append(x.cpu())

    hook = head.register_forward_pre_hook(capture)
    model.eval()
    try:
        with model.disable_adapter():  # type: ignore[operator]
            for start in range(0, len(enc), batch_size):
                index = list(range(start, min(start + batch_size, len(enc))))
                batch = {k: v.to(_device(model)) for k, v in collate(enc, index).items()}
                model(**batch)
    finally:
        hook.remove()
    if not seen:
        width = head.in_features if isinstance(head, torch.nn.Linear) else 0
        return np.zeros((0, int(width)), dtype=np.float32)
    return torch.cat(seen).numpy().astype(np.float32)


def input_fingerprint(
    adapters: AdapterModel, enc: Encoded, batch_size: int, head_module: str
) -> np.ndarray:
    """Mean representation of ``enc``'s inputs under the frozen base model (FL-TAC's fingerprint).

    See :func:`input_representations`.

    Returns
    -------
    np.ndarray
        ``(H,)`` float32; zeros for an empty set.
    """
    return mean_representation(input_representations(adapters, enc, batch_size, head_module))


def mean_representation(representations: np.ndarray) -> np.ndarray:
    """``(H,)`` mean of ``(N, H)`` rows (zeros when N = 0): the input fingerprint."""
    if representations.shape[0] == 0:
        return np.zeros(representations.shape[1], dtype=np.float32)
    return representations.astype(np.float64).mean(0).astype(np.float32)


def label_fingerprint(
    representations: np.ndarray, labels: np.ndarray, num_labels: int
) -> np.ndarray:
    """What separates a task's classes in the frozen representation (FL-TAC's label fingerprint).

    Row c is the mean representation of the examples of class c minus the *unweighted* mean of
    the present classes' means, so it does not depend on how many examples each class has (a
    client's label balance, which is what misleads a few-example head). Tasks that share inputs
    (reviews rated for sentiment, or for subjectivity) differ here: their classes split the
    same texts along different directions.

    Parameters
    ----------
    representations : np.ndarray
        ``(N, H)`` per-example representations (:func:`input_representations`).
    labels : np.ndarray
        ``(N,)`` class indices in ``[0, num_labels)``.
    num_labels : int
        C, the task's label count (rows of the result).

    Returns
    -------
    np.ndarray
        ``(C, H)`` float32; a class without examples has a zero row, and with fewer than two
        classes present every row is zero (nothing separates them).
    """
    reps = np.asarray(representations, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    out = np.zeros((num_labels, reps.shape[1]))
    present = [c for c in range(num_labels) if np.any(y == c)]
    if len(present) < 2:
        return out.astype(np.float32)
    for c in present:
        out[c] = reps[y == c].mean(0)
    out[present] -= out[present].mean(0)
    return out.astype(np.float32)


def _forward_batches(
    adapters: AdapterModel, name: str, enc: Encoded, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], Any]]:
    """Adapter ``name``'s outputs on ``enc`` in order, batch by batch: (index, batch, output)."""
    adapters.activate(name)
    model = adapters.model
    model.eval()
    for start in range(0, len(enc), batch_size):
        index = np.arange(start, min(start + batch_size, len(enc)))
        batch = {k: v.to(_device(model)) for k, v in collate(enc, index.tolist()).items()}
        yield index, batch, model(**batch)


@torch.no_grad()
def evaluate_adapter(
    adapters: AdapterModel, name: str, enc: Encoded, batch_size: int
) -> tuple[int, int, float]:
    """Accuracy counts of adapter ``name`` on ``enc``: (correct, total, summed loss).

    Classification counts examples; a causal LM counts response tokens (next-token accuracy).
    """
    correct = total = 0
    loss_sum = 0.0
    for index, batch, out in _forward_batches(adapters, name, enc, batch_size):
        if enc.kind == "causal_lm":
            labels = batch["labels"][:, 1:]
            predictions = out.logits[:, :-1].argmax(-1)
            valid = labels != IGNORE_INDEX
            correct += int(((predictions == labels) & valid).sum())
            total += int(valid.sum())
            loss_sum += float(out.loss) * int(valid.sum())
        else:
            logits = masked_logits(out.logits, enc.num_labels[index].to(logits_device(out)))
            labels = enc.labels[index].to(logits_device(out))
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(index)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    return correct, total, loss_sum


@torch.no_grad()
def example_losses(adapters: AdapterModel, name: str, enc: Encoded, batch_size: int) -> np.ndarray:
    """Loss of adapter ``name`` on every example of ``enc``, shape ``(N,)`` float64.

    Classification: cross-entropy over the example's own labels. Causal LM: mean cross-entropy
    over the example's response tokens.
    """
    parts: list[np.ndarray] = []
    for index, batch, out in _forward_batches(adapters, name, enc, batch_size):
        if enc.kind == "causal_lm":
            labels = batch["labels"][:, 1:]
            logits = out.logits[:, :-1]
            tokens = F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )  # (B, T-1)
            counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
            parts.append((tokens.sum(1) / counts).double().cpu().numpy())
        else:
            logits = masked_logits(out.logits, enc.num_labels[index].to(logits_device(out)))
            labels = enc.labels[index].to(logits_device(out))
            parts.append(F.cross_entropy(logits, labels, reduction="none").double().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros(0)
