"""The eager lowering's attention-mask pass (passes/attention_masks.py): a captured graph builds an
explicit boolean mask; eager programs drop it where it is causal or all True, and keep it otherwise."""

from __future__ import annotations

import peft
import torch
from peftc.passes.attention_masks import SDPA, simplified_mask

from tests import oracle, zoo

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_simplified_mask_recognises_causal_and_full_masks_only():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert simplified_mask(causal.expand(3, 1, 5, 5)) == (None, True)
    assert simplified_mask(torch.ones(2, 4, 5, 5, dtype=torch.bool)) == (None, False)
    padded = causal.expand(2, 1, 5, 5).clone()
    padded[1, :, :, 0] = False  # sample 1 has a padding token first
    for mask in (padded, causal[1:], causal.T.contiguous()):  # padding; 4 queries x 5 keys; anti-causal
        kept, is_causal = simplified_mask(mask)
        assert kept is mask and not is_causal


def test_eager_graph_checks_each_mask_once_and_captured_graph_keeps_it():
    pair = oracle.make_pair("llama", LORA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        pair.case.call(pair.am)
    ((captured, run),) = pair.am.eager_graphs
    sdpa = list(run.graph.find_nodes(op="call_function", target=SDPA))
    assert len(sdpa) == 2  # one per layer
    checks = list(run.graph.find_nodes(op="call_function", target=simplified_mask))
    assert len(checks) == 1  # the layers share one mask, checked once per call
    assert all(n.kwargs["attn_mask"].args[0] is checks[0] and n.kwargs["is_causal"].args[0] is checks[0] for n in sdpa)
    assert not list(captured.gm.graph.find_nodes(op="call_function", target=simplified_mask))


def test_padded_batches_keep_their_mask_and_match_peft():
    """Causal rows (mask dropped) and left-padded rows (mask kept) both equal PEFT, in train mode too."""
    pair = oracle.make_pair("llama", LORA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = pair.case.inputs["input_ids"]
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    for mask in (torch.ones_like(ids), padded):
        with torch.no_grad():
            got = pair.am(input_ids=ids, attention_mask=mask).logits
            want = pair.pm(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()  # PEFT's padded positions are not comparable outputs (fully masked rows)
        torch.testing.assert_close(got[keep], want[keep], **oracle.TOL)
    pair.am.train()
    pair.pm.train()
    for m in (pair.am, pair.pm):
        m(input_ids=ids, attention_mask=padded, labels=ids).loss.backward()
    theirs = dict(pair.pm.named_parameters())
    for name, p in pair.am.adapter_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, **oracle.TOL)


def test_training_saves_no_mask_for_backward():
    """The float mask SDPA derives from a boolean one is what an explicit mask costs in memory."""
    case = zoo.FACTORIES["llama"]()
    am = oracle.make_pair("llama", LORA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                          training=True).am
    out = am(**oracle.train_inputs(case)).loss
    stack, seen, attention = [out.grad_fn], set(), []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "ScaledDotProduct" in type(fn).__name__:
            attention.append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    assert len(attention) == 2
    assert all(getattr(fn, "_saved_attn_mask", None) is None for fn in attention)
