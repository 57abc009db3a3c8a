//! The ggml Whisper quantiser on small synthetic model files: what it
//! converts and what it keeps, the block round trip, and typed errors for
//! truncated, non-ggml and already quantised input (no partial output left).

use std::path::Path;
use triage_tools::whisper_quantize::{QuantType, QuantizeError, dequantize, quantize_ggml};

const MAGIC: u32 = 0x6767_6d6c;

struct Tensor {
    name: String,
    ne: Vec<i32>,
    ttype: i32,
    values: Vec<f32>,
}

fn tensor(name: &str, ne: &[i32], ttype: i32, seed: f32) -> Tensor {
    let n: i32 = ne.iter().product();
    Tensor {
        name: name.to_owned(),
        ne: ne.to_vec(),
        ttype,
        values: (0..n)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * 0.1)
            .collect(),
    }
}

/// Width of the synthetic model (a multiple of ggml's 32-value blocks).
const S: i32 = 64;

/// Every tensor of a one-layer Whisper of width [`S`], in the converter's
/// order, f16 matrices and f32 vectors (the first convolution in f32, as an
/// f32 model has it).
fn tensors() -> Vec<Tensor> {
    let mut out = vec![
        tensor("encoder.conv1.weight", &[3, 2, S], 0, 1.0),
        tensor("encoder.conv1.bias", &[1, S], 0, 2.0),
        tensor("encoder.conv2.weight", &[3, S, S], 1, 3.0),
        tensor("encoder.conv2.bias", &[1, S], 0, 4.0),
        tensor("encoder.positional_embedding", &[S, 4], 0, 5.0),
    ];
    let layer = |out: &mut Vec<Tensor>, prefix: &str, attns: &[&str]| {
        for (k, attn) in attns.iter().enumerate() {
            let seed = 10.0 * k as f32;
            for (part, bias) in [
                ("query", true),
                ("key", false),
                ("value", true),
                ("out", true),
            ] {
                out.push(tensor(
                    &format!("{prefix}.{attn}.{part}.weight"),
                    &[S, S],
                    1,
                    seed,
                ));
                if bias {
                    out.push(tensor(
                        &format!("{prefix}.{attn}.{part}.bias"),
                        &[S],
                        0,
                        seed,
                    ));
                }
            }
            out.push(tensor(&format!("{prefix}.{attn}_ln.weight"), &[S], 0, seed));
            out.push(tensor(&format!("{prefix}.{attn}_ln.bias"), &[S], 0, seed));
        }
        out.push(tensor(
            &format!("{prefix}.mlp.0.weight"),
            &[S, 4 * S],
            1,
            7.0,
        ));
        out.push(tensor(&format!("{prefix}.mlp.0.bias"), &[4 * S], 0, 7.0));
        out.push(tensor(
            &format!("{prefix}.mlp.2.weight"),
            &[4 * S, S],
            1,
            8.0,
        ));
        out.push(tensor(&format!("{prefix}.mlp.2.bias"), &[S], 0, 8.0));
        out.push(tensor(&format!("{prefix}.mlp_ln.weight"), &[S], 0, 9.0));
        out.push(tensor(&format!("{prefix}.mlp_ln.bias"), &[S], 0, 9.0));
    };
    layer(&mut out, "encoder.blocks.0", &["attn"]);
    out.push(tensor("encoder.ln_post.weight", &[S], 0, 11.0));
    out.push(tensor("encoder.ln_post.bias", &[S], 0, 12.0));
    out.push(tensor("decoder.token_embedding.weight", &[S, 3], 1, 13.0));
    out.push(tensor("decoder.positional_embedding", &[S, 4], 0, 14.0));
    layer(&mut out, "decoder.blocks.0", &["attn", "cross_attn"]);
    out.push(tensor("decoder.ln.weight", &[S], 0, 15.0));
    out.push(tensor("decoder.ln.bias", &[S], 0, 16.0));
    out
}

/// The ggml file of `tensors`: header, a 2 x 3 mel filterbank, three
/// tokens, then the tensors.
fn model_file(tensors: &[Tensor], ftype: i32) -> Vec<u8> {
    let mut out = MAGIC.to_le_bytes().to_vec();
    for h in [3, 4, S, 2, 1, 4, S, 2, 1, 2, ftype] {
        out.extend_from_slice(&i32::to_le_bytes(h));
    }
    out.extend_from_slice(&2i32.to_le_bytes());
    out.extend_from_slice(&3i32.to_le_bytes());
    for i in 0..6 {
        out.extend_from_slice(&(i as f32 * 0.5).to_le_bytes());
    }
    out.extend_from_slice(&3i32.to_le_bytes());
    for tok in ["a", "bc", " hello"] {
        out.extend_from_slice(&(tok.len() as u32).to_le_bytes());
        out.extend_from_slice(tok.as_bytes());
    }
    for t in tensors {
        out.extend_from_slice(&(t.ne.len() as i32).to_le_bytes());
        out.extend_from_slice(&(t.name.len() as i32).to_le_bytes());
        out.extend_from_slice(&t.ttype.to_le_bytes());
        for e in &t.ne {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.extend_from_slice(t.name.as_bytes());
        for v in &t.values {
            if t.ttype == 1 {
                out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            } else {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// Parsed tensors of a written file: (name, type, ne, data bytes).
/// A tensor as the file holds it: name, ggml type, shape, data.
type ReadTensor = (String, i32, Vec<i32>, Vec<u8>);

fn read_tensors(bytes: &[u8]) -> (Vec<i32>, Vec<u8>, Vec<ReadTensor>) {
    let i32_at = |at: usize| i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let hparams: Vec<i32> = (0..11).map(|i| i32_at(4 + 4 * i)).collect();
    let mut at = 48;
    let (n_mel, n_fft) = (i32_at(at) as usize, i32_at(at + 4) as usize);
    at += 8 + 4 * n_mel * n_fft;
    let n_vocab = i32_at(at) as usize;
    at += 4;
    for _ in 0..n_vocab {
        at += 4 + i32_at(at) as usize;
    }
    let prefix = bytes[48..at].to_vec();
    let mut out = Vec::new();
    while at < bytes.len() {
        let (n_dims, len, ttype) = (i32_at(at), i32_at(at + 4) as usize, i32_at(at + 8));
        at += 12;
        let ne: Vec<i32> = (0..n_dims as usize).map(|i| i32_at(at + 4 * i)).collect();
        at += 4 * n_dims as usize;
        let name = String::from_utf8(bytes[at..at + len].to_vec()).unwrap();
        at += len;
        let n: usize = ne.iter().map(|e| *e as usize).product();
        let size = match ttype {
            0 => n * 4,
            1 => n * 2,
            8 => n / 32 * 34,
            7 => n / 32 * 24,
            t => panic!("type {t}"),
        };
        out.push((name, ttype, ne, bytes[at..at + size].to_vec()));
        at += size;
    }
    (hparams, prefix, out)
}

#[test]
fn weights_are_quantised_and_everything_else_kept() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("ggml-model-f16.bin");
    let source = tensors();
    let bytes = model_file(&source, 1);
    std::fs::write(&input, &bytes)?;
    for (ty, code, ftype) in [(QuantType::Q8_0, 8, 2007), (QuantType::Q5_1, 7, 2009)] {
        let out = dir.path().join(format!("q-{ty}.bin"));
        let report = quantize_ggml(&input, &out, ty)?;
        // 6 encoder and 10 decoder matrices, and the token embedding.
        assert_eq!((report.tensors, report.quantized), (source.len(), 17));
        assert_eq!(source.len(), 50);
        let written = std::fs::read(&out)?;
        assert_eq!(report.bytes_out, written.len() as u64);
        let (hparams, prefix, got) = read_tensors(&written);
        let (src_hparams, src_prefix, _) = read_tensors(&bytes);
        assert_eq!(hparams[..10], src_hparams[..10]);
        assert_eq!(hparams[10], ftype);
        // Mel filterbank and vocabulary are copied unchanged.
        assert_eq!(prefix, src_prefix);
        let names: Vec<&str> = got.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(
            names,
            source.iter().map(|t| t.name.as_str()).collect::<Vec<_>>()
        );
        for ((name, ttype, ne, data), src) in got.iter().zip(&source) {
            assert_eq!(ne, &src.ne, "{name}");
            let expected_type = if ne.len() == 2 && name.ends_with(".weight") {
                code
            } else if name.starts_with("encoder.conv") && name.ends_with(".weight") {
                // whisper.cpp keeps the convolutions in f16 in quantised models.
                1
            } else {
                src.ttype
            };
            assert_eq!(*ttype, expected_type, "{name}");
            if *ttype == code {
                let back = dequantize(data, ty);
                assert_eq!(back.len(), src.values.len());
                let max_err = back
                    .iter()
                    .zip(&src.values)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Values are within ±0.1: q8_0 steps are 0.1/127, q5_1 0.2/31.
                let bound = if ty == QuantType::Q8_0 { 1e-3 } else { 4e-3 };
                assert!(max_err < bound, "{name} {ty}: {max_err}");
            }
        }
        assert!(!dir.path().join(format!("q-{ty}.bin.partial")).exists());
    }
    Ok(())
}

fn expect_err(input: &[u8], out_name: &str) -> QuantizeError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.bin");
    std::fs::write(&path, input).unwrap();
    let out = dir.path().join(out_name);
    let err = quantize_ggml(&path, &out, QuantType::Q8_0).unwrap_err();
    // A failed run leaves no output, partial or whole.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("in.bin")], "{err}");
    err
}

#[test]
fn truncated_files_are_typed_errors_at_every_cut() {
    let bytes = model_file(&tensors(), 1);
    // Inside the header, the mel filterbank, the vocabulary, a tensor's
    // header, its name and its data, and between two tensors.
    let between = bytes.len() - (12 + 4 + "decoder.ln.bias".len() + 4 * S as usize);
    for cut in [6, 50, 60, 90, 110, 130, 200, between, bytes.len() - 1] {
        let err = expect_err(&bytes[..cut], "out.bin");
        assert!(
            matches!(err, QuantizeError::Truncated { .. }),
            "cut {cut}: {err:?}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn non_ggml_and_quantised_input_are_refused() {
    let err = expect_err(b"RIFF\x24\x00\x00\x00WAVEfmt ", "out.bin");
    assert!(matches!(err, QuantizeError::NotGgml { .. }), "{err:?}");
    let err = expect_err(b"", "out.bin");
    assert!(matches!(err, QuantizeError::NotGgml { .. }), "{err:?}");
    let err = expect_err(&model_file(&tensors(), 2007), "out.bin");
    assert!(
        matches!(err, QuantizeError::AlreadyQuantized { ftype: 2007, .. }),
        "{err:?}"
    );
    // A row length ggml's blocks cannot hold.
    let mut odd = tensors();
    odd[5] = tensor("encoder.blocks.0.attn.query.weight", &[48, 2], 1, 0.0);
    let err = expect_err(&model_file(&odd, 1), "out.bin");
    assert!(err.to_string().contains("multiple of 32"), "{err}");
    // A corrupt name length is refused before anything is allocated.
    let mut bytes = model_file(&tensors(), 1);
    let first_tensor = 48 + 8 + 24 + 4 + (4 + 1) + (4 + 2) + (4 + 6);
    bytes[first_tensor + 4..first_tensor + 8].copy_from_slice(&i32::MAX.to_le_bytes());
    let err = expect_err(&bytes, "out.bin");
    assert!(matches!(err, QuantizeError::Corrupt { .. }), "{err:?}");
}

#[test]
fn the_shared_tiny_en_model_quantises_to_a_smaller_file() -> anyhow::Result<()> {
    let Some(shared) = std::env::var_os("TRIAGE_SHARED") else {
        return Ok(());
    };
    let input = Path::new(&shared).join("models/whisper-tiny.en/ggml-model-f16.bin");
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("ggml-model-q5_1.bin");
    let report = quantize_ggml(&input, &out, QuantType::Q5_1)?;
    // 4 + 4 layers: 6 encoder and 10 decoder matrices each, plus the token embedding.
    assert_eq!(report.quantized, 4 * 6 + 4 * 10 + 1);
    assert!(report.bytes_out * 2 < report.bytes_in, "{report:?}");
    Ok(())
}
