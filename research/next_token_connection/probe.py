"""Can the composition read m_A's own next-token prediction? A connection from Gemma's last block, started as a
logit ensemble through the two models' shared vocabulary.

Gemma-3 270M predicts the reference far better than SmolLM2 under teacher forcing (2.05 against 3.13 nats per
token on John), yet 150-450 steps of cross-attention into SmolLM2's upper blocks carry little of it. This probe
adds a connection from Gemma's last block (read through its final norm: what its LM head reads) into SmolLM2's
last block, with m_A reading the completion token by token (`augment_mode="stepwise"`, no cross-tokenizer lag),
and starts that connection as an ensemble rather than at zero:

- f_proj = M, the least-squares map with E_B diag(g) M = E_A over the tokens whose text is the same in both
  vocabularies (E: the tied LM heads, g: SmolLM2's final-norm gain), so SmolLM2's head reads M h as Gemma's head
  reads h;
- values = identity, output = c * identity, c a multiple of SmolLM2's median residual RMS at its last block;
- queries and keys = a rank-1 map of each side's mean normalised state to one fixed vector, times `sharpness`, so
  that under the rotary encoding each anchor position attends to the newest Gemma token it may see.

    .venv/bin/python research/next_token_connection/probe.py nll OUT.json            # no training: NLL by c
    .venv/bin/python research/next_token_connection/probe.py train C OUT_DIR [STEPS]  # C = 0: learned from zero

Outcome (results/translation/README.md, "A connection from m_A's last block"): the ensemble start lowers the
untrained loss a little (3.82 -> 3.71) but trains worse; learned from zero the connection changes nothing
(`result_c0.json`: chrF 17.9, as recipe 2).
"""

import json
import os
import sys
from pathlib import Path

import torch

from calm.eval import mean_loss
from calm.experiments import translation as exp
from calm.tasks import translation as task

CONNECTIONS = [[3, 14], [7, 19], [11, 24], [17, 29]]


def shared_vocabulary(anchor_tokenizer, augment_tokenizer) -> tuple[list[int], list[int]]:
    """Token ids (anchor, augment) of the tokens whose text is the same in both vocabularies."""
    augment = {}
    for token, i in augment_tokenizer.get_vocab().items():
        if not (token.startswith("<") and token.endswith(">")):
            augment.setdefault(token.replace("\u2581", " "), i)
    pairs = []
    for token, i in anchor_tokenizer.get_vocab().items():
        text = anchor_tokenizer.convert_tokens_to_string([token])
        if text and "\ufffd" not in text and text in augment:
            pairs.append((i, augment[text]))
    return [a for a, _ in pairs], [b for _, b in pairs]


def mean_state(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (states * mask[..., None]).sum((0, 1)) / mask.sum()


@torch.no_grad()
def ensemble_init(model, bases, data, scale: float, sharpness: float = 16.0) -> dict:
    layer = model.composition[0][-1]
    anchor, augment = bases.anchor, bases.augment
    anchor_ids, augment_ids = shared_vocabulary(bases.tokenizer, bases.augment_tokenizer)
    gain = anchor.model.norm.weight
    e_b = anchor.get_output_embeddings().weight[anchor_ids] * gain
    e_a = augment.get_output_embeddings().weight[augment_ids]
    m = torch.linalg.lstsq(e_b, e_a).solution  # (576, 640)
    fit = 1 - (e_b @ m - e_a).pow(2).sum() / (e_a - e_a.mean(0)).pow(2).sum()
    layer.proj.weight.copy_(m)
    layer.proj.bias.zero_()
    # The states this layer reads, on a few training examples: queries (after its norm) and keys (after f_proj's).
    examples = data.training_examples("uk")[:16]
    batch = bases.tokenizer([e["prompt"] + e["completion"] for e in examples], return_tensors="pt", padding=True)
    seen = {}
    def keep(module, args, output):
        seen["anchor"] = output[0] if isinstance(output, tuple) else output

    handle = anchor.model.layers[29].register_forward_hook(keep)
    inputs = model.align(batch["input_ids"], batch["attention_mask"], augment_mode="stepwise")
    states = model.compute_augment_states(batch["input_ids"], batch["attention_mask"], inputs)[0][17]
    anchor(**batch)
    handle.remove()
    mask = batch["attention_mask"].float()
    residual_rms = seen["anchor"].pow(2).mean(-1).sqrt()[mask.bool()].median()
    queries = layer.query_norm(seen["anchor"])
    keys = layer.proj_norm(layer.proj(layer.augment_norm(states)))
    mu_q = mean_state(queries, mask)
    mu_k = mean_state(keys, inputs[0]["attention_mask"].float())
    target = torch.ones(layer.head_dim * layer.num_heads) * sharpness
    layer.q.weight.copy_(torch.outer(target, mu_q) / mu_q.pow(2).sum())
    layer.k.weight.copy_(torch.outer(target, mu_k) / mu_k.pow(2).sum())
    layer.v.weight.copy_(torch.eye(layer.v.weight.shape[0]))
    layer.o.weight.copy_(torch.eye(layer.o.weight.shape[0]) * scale * residual_rms)
    return {"shared_tokens": len(anchor_ids), "lstsq_r2": round(float(fit), 3),
            "residual_rms": round(float(residual_rms), 2), "scale": scale}


def build(bases, spec, data, scale: float):
    torch.manual_seed(0)  # as `calm reproduce translation` builds its CALM rows
    model = exp.compose(bases, spec)
    info = ensemble_init(model, bases, data, scale) if scale else {"scale": 0}
    return model, info


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    what = sys.argv[1]
    steps = int(sys.argv[4]) if what == "train" and len(sys.argv) > 4 else 150
    spec = exp.TranslationSpec(eval_split="validation", connections=CONNECTIONS, augment_mode="stepwise",
                               steps=steps)
    bases = exp.load_bases(spec)
    data = exp.make_data(spec, bases.tokenizer)
    if what == "nll":
        held = [task.example(p, spec.language) for p in data.eval[:48]]
        rows = []
        for scale in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0):  # the README quotes these (sharpness 16)
            model, info = build(bases, spec, data, scale)
            info["validation_nll"] = round(mean_loss(model, bases.tokenizer, held, batch_size=8), 4)
            print(info, flush=True)
            rows.append(info)
        Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
        return
    scale, out = float(sys.argv[2]), Path(sys.argv[3])
    model, info = build(bases, spec, data, scale)
    print(info, flush=True)
    run = exp.train_on_d_c(model, bases.tokenizer, data, spec, out / "train", spec.lr, seed=0)
    hypotheses = exp.translate(model, bases.tokenizer, data.prompts(spec.language), spec)
    result = {**info, **run, **exp.scores(hypotheses, [p.english for p in data.eval]),
              "english_ppl": exp.english_perplexity(model, bases.tokenizer, spec),
              "hypotheses": hypotheses[:10]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print({k: v for k, v in result.items() if k != "hypotheses"})


if __name__ == "__main__":
    main()
