"""U-Net blocks and the whole U-Net against diffusers, on seeded random weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tinysd import attention, resnet, unet  # noqa: E402
from torch_util import assert_close, randomize_, sd_v15_config, state_dict_numpy, to_numpy  # noqa: E402

# SD v1's topology (4 levels, cross-attention in the first three, 2 resnets down / 3 up,
# attention in the mid block, 8 heads), only narrower.
TINY_UNET = dict(sd_v15_config("unet"), block_out_channels=[32, 64, 64, 64], cross_attention_dim=32)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def load(ours, ref):
    return ours.load_state_dict(state_dict_numpy(ref))


def test_resnet_block():
    from diffusers.models.resnet import ResnetBlock2D

    ref = randomize_(ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=48, eps=1e-5), 1)
    ours = load(resnet.ResnetBlock2D(32, 64, 48, 32, 1e-5), ref)
    x, temb = rand(2, 32, 6, 10), rand(2, 48, seed=1)
    with torch.no_grad():
        expected = to_numpy(ref(torch.from_numpy(x), torch.from_numpy(temb)))
    assert_close(ours(x, temb), expected)


def test_transformer_2d_cross_attention():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    ref = randomize_(Transformer2DModel(num_attention_heads=8, attention_head_dim=8, in_channels=64,
                                        cross_attention_dim=32, norm_num_groups=32), 2)
    ours = load(attention.Transformer2DModel(8, 8, 64, 32), ref)
    x, ctx = rand(2, 64, 4, 6), rand(2, 77, 32, seed=1)
    with torch.no_grad():
        expected = to_numpy(ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).sample)
    assert_close(ours(x, ctx), expected)


def reference_unet(config, seed=0):
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    return randomize_(diffusers.UNet2DConditionModel(**keep), seed, scale=0.1)


def run_both(config, shape, seed=0, t=(999, 10)):
    ref = reference_unet(config, seed)
    ours = load(unet.UNet2DConditionModel(config), ref)
    x = rand(*shape, seed=seed)
    ctx = rand(shape[0], 77, config["cross_attention_dim"], seed=seed + 1)
    t = np.array(t[:shape[0]])
    with torch.no_grad():
        expected = to_numpy(ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    return ours(x, t, ctx), expected, ref, ours


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 8, 16), (1, 4, 9, 13)],
                         ids=["square", "non-square", "odd"])
def test_unet_matches_diffusers(shape):
    actual, expected, *_ = run_both(TINY_UNET, shape)
    assert_close(actual, expected)


def test_unet_blocks_match_diffusers():
    """Each down block, the mid block and each up block on the reference's own inputs."""
    ref = reference_unet(TINY_UNET, 3)
    ours = load(unet.UNet2DConditionModel(TINY_UNET), ref)
    x, ctx = rand(1, 4, 8, 8), rand(1, 77, 32, seed=1)
    with torch.no_grad():
        tx, tctx = torch.from_numpy(x), torch.from_numpy(ctx)
        temb = ref.time_embedding(ref.time_proj(torch.tensor([500])))
        assert_close(ours.time_embedding(unet.timestep_embedding(np.array([500.0]), 32)), to_numpy(temb),
                     name="time embedding")
        h, t_temb = ref.conv_in(tx), temb
        skips = [h]
        for i, (rb, ob) in enumerate(zip(ref.down_blocks, ours.down_blocks)):
            kw = dict(encoder_hidden_states=tctx) if hasattr(rb, "attentions") else {}
            h_ref, res = rb(h, t_temb, **kw)
            h_ours, res_ours = ob(to_numpy(h), to_numpy(t_temb), ctx)
            assert_close(h_ours, to_numpy(h_ref), name=f"down_blocks.{i}")
            h, skips = h_ref, skips + list(res)
        h_ref = ref.mid_block(h, t_temb, encoder_hidden_states=tctx)
        assert_close(ours.mid_block(to_numpy(h), to_numpy(t_temb), ctx), to_numpy(h_ref), name="mid_block")
        h = h_ref
        for i, (rb, ob) in enumerate(zip(ref.up_blocks, ours.up_blocks)):
            n = len(rb.resnets)
            res, skips = skips[-n:], skips[:-n]
            kw = dict(encoder_hidden_states=tctx) if hasattr(rb, "attentions") else {}
            h_ref = rb(h, tuple(res), t_temb, **kw)
            h_ours = ob(to_numpy(h), [to_numpy(r) for r in res], to_numpy(t_temb), ctx)
            assert_close(h_ours, to_numpy(h_ref), name=f"up_blocks.{i}")
            h = h_ref


def test_inpainting_unet_nine_channels():
    actual, expected, *_ = run_both(dict(TINY_UNET, in_channels=9), (2, 9, 8, 8))
    assert_close(actual, expected)


def test_parameter_names_match_diffusers():
    ref = reference_unet(TINY_UNET)
    ours = unet.UNet2DConditionModel(TINY_UNET)
    assert sorted(k for k, _ in ours.named_parameters()) == sorted(ref.state_dict())


def test_rejects_sd2_config():
    with pytest.raises(ValueError, match="use_linear_projection"):
        unet.UNet2DConditionModel(dict(TINY_UNET, use_linear_projection=True))
