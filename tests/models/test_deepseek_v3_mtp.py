"""The DeepSeek NextN (MTP) layer: loaded from ``model.layers.{N}`` and equal to HF's MtpModel."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.utils import PagedDriver, Seq, build_hf, rel_err, tiny_deepseek_hf_config
from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch
from tokenspeed_engine.models import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """A checkpoint whose layer N (= num_hidden_layers) is a NextN layer, laid out as DeepSeek ships it."""
    config = tiny_deepseek_hf_config(num_nextn_predict_layers=1)
    n, h = config.num_hidden_layers, config.hidden_size
    hf = build_hf(config, seed=1)
    path = tmp_path_factory.mktemp("deepseek_mtp")
    hf.save_pretrained(path, max_shard_size="200KB")
    # the NextN decoder block: layer N of an (N+1)-layer model, already in checkpoint naming
    donor_dir = tmp_path_factory.mktemp("donor")
    build_hf(tiny_deepseek_hf_config(num_hidden_layers=n + 1), seed=7).save_pretrained(donor_dir)
    donor = load_file(donor_dir / "model.safetensors")
    mtp = {k: v for k, v in donor.items() if k.startswith(f"model.layers.{n}.")}
    g = torch.Generator().manual_seed(3)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{n}.{norm}.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    mtp[f"model.layers.{n}.eh_proj.weight"] = 0.1 * torch.randn(h, 2 * h, generator=g)
    mtp[f"model.layers.{n}.shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    mtp[f"model.layers.{n}.embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    save_file(mtp, path / "model-mtp.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path, n


def _hf_reference(path, n: int):
    """HF's main model and MtpModel read from the same checkpoint."""
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    saved = DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected
    # HF finds NextN weights through this pattern, written for DeepSeek-V3's layer 61
    DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}.*"]
    try:
        main = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        return main, MtpModel.from_pretrained(main).eval()
    finally:
        DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = saved


def test_mtp_layer_matches_hf(mtp_ckpt):
    path, n = mtp_ckpt
    model = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    assert len(model.mtp) == 1 and len(model.make_kv_cache(4, 4)) == n + 1
    hf_main, hf_mtp = _hf_reference(path, n)
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(5)).tolist()

    drv, seq = PagedDriver(model, seed=6), Seq([])
    logits, hidden = drv.run([seq], [prompt], ForwardMode.EXTEND, return_hidden=True)
    nxt = int(logits[-1].argmax())
    # draft input: token t+1 with the main model's hidden state of token t (same pages, cache layer N)
    draft_ids = prompt[1:] + [nxt]
    batch = build_forward_batch([SequenceInput(0, draft_ids, seq.pages)], drv.page_size)
    mtp_logits = model.forward_mtp(batch, drv.kv, hidden, return_all_logits=True)

    out = hf_main(torch.tensor([prompt]), output_hidden_states=True)
    h = out.hidden_states[-1]
    ref = hf_mtp._project_to_logits(
        hf_mtp.forward_layer(0, h, torch.arange(1, 10)[None], None, input_ids=torch.tensor([draft_ids]))
    )[0]
    assert rel_err(mtp_logits, ref) < TOL

    # one cached MTP decode step: the draft for the token after ``nxt``
    main_logits, main_hidden = drv.run([seq], [[nxt]], ForwardMode.DECODE, return_hidden=True)
    nxt2 = int(main_logits[0].argmax())
    batch = build_forward_batch([SequenceInput(9, [nxt2], seq.pages)], drv.page_size, ForwardMode.DECODE)
    step = model.forward_mtp(batch, drv.kv, main_hidden)
    full = prompt + [nxt]
    h = hf_main(torch.tensor([full]), output_hidden_states=True).hidden_states[-1]
    ref = hf_mtp._project_to_logits(
        hf_mtp.forward_layer(0, h, torch.arange(1, 11)[None], None, input_ids=torch.tensor([full[1:] + [nxt2]]))
    )[0, -1]
    assert rel_err(step[0], ref) < TOL


def test_mtp_skipped_or_required(mtp_ckpt, deepseek_ckpt):
    path, _ = mtp_ckpt
    assert len(load_model(path, dtype=torch.float32, device="cpu", progress=False, load_mtp=False).mtp) == 0
    _, plain = deepseek_ckpt  # config says num_nextn_predict_layers = 0
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        load_model(plain, dtype=torch.float32, device="cpu", progress=False, load_mtp=True)
