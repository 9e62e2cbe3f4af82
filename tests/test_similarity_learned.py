"""The contrastive encoder, its augmentations, the CLAP/MERT loaders, and the music demo's data makers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("librosa")
pytest.importorskip("faiss")

from sourcetrace.demos.music import Chorale, from_tokens, synthesize, to_tokens  # noqa: E402
from sourcetrace.similarity import augment, make_embedder  # noqa: E402
from sourcetrace.similarity.contrastive import nt_xent  # noqa: E402
from sourcetrace.similarity.pretrained import PretrainedFilesError  # noqa: E402

SR = 8000


def peak_hz(x, sr=SR):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def test_nt_xent_equals_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()
    total = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.5 for j in others])
        total += -(z[i] @ z[pos] / 0.5 - torch.logsumexp(logits, 0))
    assert float(nt_xent(z1, z2, 0.5)) == pytest.approx(float(total / 10), rel=1e-5)


def test_augmentations_do_what_they_say():
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert peak_hz(augment.pitch_shift(tone, SR, 12)) == pytest.approx(880, abs=4)
    stretched = augment.time_stretch(tone, 2.0)
    assert len(stretched) == pytest.approx(SR / 2, abs=SR * 0.02)
    assert peak_hz(stretched) == pytest.approx(440, abs=4)
    rng = np.random.default_rng(0)
    noisy = augment.add_noise(tone, 10.0, rng)
    noise = (noisy - tone).astype(np.float64)
    snr = 10 * np.log10(np.mean(tone.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert snr == pytest.approx(10.0, abs=0.01)
    assert len(augment.reverb(tone, SR, rng)) == len(tone)
    assert np.array_equal(augment.fit_length(np.arange(10.0), 6), np.arange(2.0, 8.0))
    assert augment.fit_length(np.ones(4), 6).tolist() == [0, 1, 1, 1, 1, 0]


def clips_of_melodies(n=8, seconds=1.0):
    rng = np.random.default_rng(1)
    t = np.arange(int(SR * seconds)) / SR
    out = []
    for _ in range(n):
        notes = rng.choice([262, 294, 330, 349, 392, 440, 494], size=4)
        seg = len(t) // 4
        x = np.concatenate([np.sin(2 * np.pi * f * t[:seg]) for f in notes])
        out.append(np.pad(x, (0, len(t) - len(x))))
    return (0.4 * np.stack(out)).astype(np.float32)


@pytest.mark.slow
def test_contrastive_encoder_trains_saves_and_reloads():
    clips = clips_of_melodies()
    enc = make_embedder("contrastive", sample_rate=SR, steps=40, views=1, batch=8, channels=(8, 16), dim=16)
    with pytest.raises(Exception, match="not trained yet"):
        enc.embed(clips)
    before = enc.fingerprint
    vectors = enc.fit_embed(clips)
    assert np.mean(enc.losses[-5:]) < np.mean(enc.losses[:5])  # NT-Xent fell while training
    assert vectors.shape == (8, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert enc.fingerprint != before
    again = make_embedder("contrastive", sample_rate=SR, steps=40, views=1, batch=8, channels=(8, 16), dim=16)
    again.load_state_dict(enc.state_dict())
    assert again.fingerprint == enc.fingerprint
    np.testing.assert_allclose(again.embed(clips), vectors, atol=1e-5)


def test_demo_tokens_round_trip_and_synthesis_pitch():
    notes = [(0.0, 1.0, 72, 0), (1.0, 0.5, 74, 0), (0.0, 2.0, 64, 1), (0.5, 1.5, 55, 2), (0.0, 0.5, 48, 3)]
    chorale = Chorale("test", notes)
    assert from_tokens(to_tokens(chorale, steps=4)) == sorted(notes)
    audio = synthesize([(0.0, 2.0, 69, 0)], "clarinet", SR, bpm=60, quarters=2.0)
    assert peak_hz(audio[: SR]) == pytest.approx(440, abs=2)
    assert np.abs(audio).max() == pytest.approx(0.8, abs=1e-5)


def test_pretrained_folders_missing_files_are_named(tmp_path):
    with pytest.raises(PretrainedFilesError, match="not a folder"):
        make_embedder("clap", folder=str(tmp_path / "nowhere"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(PretrainedFilesError, match="preprocessor_config.json, model.safetensors or "
                                                   "pytorch_model.bin"):
        make_embedder("mert", folder=str(tmp_path / "m"))


@pytest.mark.slow
def test_clap_and_mert_from_tiny_random_configs_match_transformers(tmp_path):
    tr = pytest.importorskip("transformers")
    audio_cfg = tr.ClapAudioConfig(window_size=4, num_mel_bins=16, spec_size=64, patch_size=2, patch_stride=2,
                                   hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 2],
                                   num_attention_heads=[2, 2], projection_dim=16, num_hidden_layers=2)
    text_cfg = tr.ClapTextConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37, projection_dim=16, max_position_embeddings=40)
    clap = tr.ClapModel(tr.ClapConfig(text_config=text_cfg.to_dict(), audio_config=audio_cfg.to_dict(),
                                      projection_dim=16)).eval()
    extractor = tr.ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=2,
                                        fft_window_size=400, truncation="rand_trunc")
    clap.save_pretrained(tmp_path / "clap")
    extractor.save_pretrained(tmp_path / "clap")
    clips = (0.1 * np.random.default_rng(0).standard_normal((3, 16000 * 2))).astype(np.float32)
    got = make_embedder("clap", folder=str(tmp_path / "clap")).embed(clips)
    with torch.no_grad():
        out = clap.get_audio_features(**extractor(list(clips), sampling_rate=16000, return_tensors="pt"))
    want = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    hubert = tr.HubertModel(tr.HubertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=20, conv_dim=(8, 8), conv_stride=(5, 4),
                                            conv_kernel=(10, 8), num_conv_pos_embeddings=8,
                                            num_conv_pos_embedding_groups=2)).eval()
    hubert.save_pretrained(tmp_path / "mert")
    tr.Wav2Vec2FeatureExtractor(sampling_rate=24000).save_pretrained(tmp_path / "mert")
    mert = make_embedder("mert", folder=str(tmp_path / "mert"))
    x = (0.1 * np.random.default_rng(1).standard_normal((2, 24000))).astype(np.float32)
    with torch.no_grad():
        normed = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-7)  # the extractor's
        hidden = hubert(torch.from_numpy(normed), output_hidden_states=True).hidden_states
    want = torch.nn.functional.normalize(torch.stack(hidden).mean(0).mean(1), dim=1).numpy()
    np.testing.assert_allclose(mert.embed(x), want, atol=1e-4)
    with pytest.raises(Exception, match="24000 Hz"):
        mert.embed(x, sample_rate=16000)


@pytest.mark.slow
def test_music_demo_runs_end_to_end_on_a_tiny_setting(tmp_path):
    pytest.importorskip("music21")
    from sourcetrace.demos.music import MusicSetting, run

    setting = MusicSetting(pieces=5, planted=1, copies=3, steps=16, generator_steps=3, sample_rate=SR)
    report = run(tmp_path, setting, progress=False)
    text = report.read_text()
    assert "data:audio/wav;base64," in text and "generation 0" in text
    assert len(list((tmp_path / "train").glob("*.wav"))) == 5
