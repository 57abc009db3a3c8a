//! The CTranslate2 → ggml Whisper importer: `model.bin` parsing and its
//! errors on small synthetic files, the q/k/v split, and (when the real
//! tiny.en inputs are there) a byte-for-byte comparison with the shipped
//! whisper.cpp file.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use triage_tools::whisper_import::{
    Ct2DType, Ct2FormatError, Ct2Model, FloatType, GGML_FILE, ImportError, ImportOptions, NpyArray,
    SAFETENSORS_FILE, WhisperCheckpoint, import_ct2, write_ggml, write_safetensors,
};

/// sha256 of `whisper-tiny.en/ggml-model-f16.bin`, for when `TRIAGE_SHARED` is unset.
const GGML_SHA256: &str = "71d64e4b9ec38f893a67ff700ca6654d89a09b19f77e768d193d0bb2bcdd54b1";
/// sha256 of the HF-named `model.safetensors` the same conversion yields.
const SAFETENSORS_SHA256: &str = "27e6cbbc03132b9e95bc2ff4fe1a8c4ccb207f77998cc7567a3945b626b733f7";

// ---------------------------------------------------------------------------
// Synthetic model.bin files

const F32: u8 = 0;
const I16: u8 = 2;
const F16: u8 = 4;

struct Var {
    name: String,
    shape: Vec<u32>,
    dtype: u8,
    data: Vec<u8>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16 + 1).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn model_bin(spec: &str, vars: &[Var], aliases: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&6u32.to_le_bytes());
    put_string(&mut out, spec);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(vars.len() as u32).to_le_bytes());
    for v in vars {
        put_string(&mut out, &v.name);
        out.push(v.shape.len() as u8);
        for d in &v.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.push(v.dtype);
        out.extend_from_slice(&(v.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&v.data);
    }
    out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
    for (a, t) in aliases {
        put_string(&mut out, a);
        put_string(&mut out, t);
    }
    out
}

/// An f32 variable whose element i holds `base + i`, so slices can be traced.
fn f32_var(name: &str, shape: &[u32], base: f32) -> Var {
    let n: u32 = shape.iter().product();
    Var {
        name: name.to_owned(),
        shape: shape.to_vec(),
        dtype: F32,
        data: (0..n)
            .flat_map(|i| (base + i as f32).to_le_bytes())
            .collect(),
    }
}

fn i16_scalar(name: &str, v: i16) -> Var {
    Var {
        name: name.to_owned(),
        shape: vec![],
        dtype: I16,
        data: v.to_le_bytes().to_vec(),
    }
}

fn small_header_model() -> Vec<u8> {
    let weight = Var {
        name: "decoder/embeddings/weight".into(),
        shape: vec![2, 3],
        dtype: F16,
        data: vec![0; 12],
    };
    model_bin(
        "WhisperSpec",
        &[weight, i16_scalar("encoder/num_heads", 6)],
        &[("decoder/projection/weight", "decoder/embeddings/weight")],
    )
}

/// A complete Whisper model with n_state 4, n_mels 2, one encoder and one
/// decoder layer, 2 heads, vocab 5, contexts 3 and 2; every tensor distinct.
fn tiny_whisper(dtype_of_q: u8) -> Vec<u8> {
    let s = 4u32;
    let mut vars = Vec::new();
    let mut base = 0.0f32;
    let mut add = |vars: &mut Vec<Var>, name: &str, shape: &[u32]| {
        vars.push(f32_var(name, shape, base));
        base += 1000.0;
    };
    add(&mut vars, "encoder/conv1/weight", &[s, 2, 3]);
    add(&mut vars, "encoder/conv1/bias", &[s]);
    add(&mut vars, "encoder/conv2/weight", &[s, s, 3]);
    add(&mut vars, "encoder/conv2/bias", &[s]);
    add(&mut vars, "encoder/position_encodings/encodings", &[3, s]);
    add(&mut vars, "decoder/embeddings/weight", &[5, s]);
    add(&mut vars, "decoder/position_encodings/encodings", &[2, s]);
    for side in ["encoder", "decoder"] {
        let l = format!("{side}/layer_0");
        add(
            &mut vars,
            &format!("{l}/self_attention/linear_0/weight"),
            &[3 * s, s],
        );
        add(
            &mut vars,
            &format!("{l}/self_attention/linear_0/bias"),
            &[3 * s],
        );
        add(
            &mut vars,
            &format!("{l}/self_attention/linear_1/weight"),
            &[s, s],
        );
        add(
            &mut vars,
            &format!("{l}/self_attention/linear_1/bias"),
            &[s],
        );
        for norm in ["self_attention", "ffn"] {
            add(&mut vars, &format!("{l}/{norm}/layer_norm/gamma"), &[s]);
            add(&mut vars, &format!("{l}/{norm}/layer_norm/beta"), &[s]);
        }
        add(&mut vars, &format!("{l}/ffn/linear_0/weight"), &[2 * s, s]);
        add(&mut vars, &format!("{l}/ffn/linear_0/bias"), &[2 * s]);
        add(&mut vars, &format!("{l}/ffn/linear_1/weight"), &[s, 2 * s]);
        add(&mut vars, &format!("{l}/ffn/linear_1/bias"), &[s]);
        add(&mut vars, &format!("{side}/layer_norm/gamma"), &[s]);
        add(&mut vars, &format!("{side}/layer_norm/beta"), &[s]);
        vars.push(i16_scalar(&format!("{side}/num_heads"), 2));
    }
    let l = "decoder/layer_0/attention";
    add(&mut vars, &format!("{l}/linear_0/weight"), &[s, s]);
    add(&mut vars, &format!("{l}/linear_0/bias"), &[s]);
    add(&mut vars, &format!("{l}/linear_1/weight"), &[2 * s, s]);
    add(&mut vars, &format!("{l}/linear_1/bias"), &[2 * s]);
    add(&mut vars, &format!("{l}/linear_2/weight"), &[s, s]);
    add(&mut vars, &format!("{l}/linear_2/bias"), &[s]);
    add(&mut vars, &format!("{l}/layer_norm/gamma"), &[s]);
    add(&mut vars, &format!("{l}/layer_norm/beta"), &[s]);
    if dtype_of_q != F32
        && let Some(q) = vars
            .iter_mut()
            .find(|v| v.name == "encoder/layer_0/self_attention/linear_0/weight")
    {
        q.dtype = dtype_of_q;
        q.data
            .truncate(q.data.len() / 4 * usize::from(dtype_size(dtype_of_q)));
    }
    model_bin(
        "WhisperSpec",
        &vars,
        &[("decoder/projection/weight", "decoder/embeddings/weight")],
    )
}

fn dtype_size(code: u8) -> u8 {
    match code {
        1 => 1,
        2 | 4 => 2,
        _ => 4,
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

// ---------------------------------------------------------------------------
// Unit tests on synthetic files

#[test]
fn parses_header_variables_and_aliases() {
    let bytes = small_header_model();
    let model = Ct2Model::parse(&bytes).unwrap();
    assert_eq!(model.binary_version, 6);
    assert_eq!(model.spec, "WhisperSpec");
    assert_eq!(model.spec_revision, 3);
    assert_eq!(model.variables.len(), 2);
    let w = &model.variables[0];
    assert_eq!(w.name, "decoder/embeddings/weight");
    assert_eq!(w.shape, vec![2, 3]);
    assert_eq!(w.dtype, Ct2DType::F16);
    assert_eq!(w.data.len(), 12);
    assert_eq!(model.get("encoder/num_heads").unwrap().as_int(), Some(6));
    assert_eq!(
        model.aliases,
        vec![(
            "decoder/projection/weight".to_owned(),
            "decoder/embeddings/weight".to_owned()
        )]
    );
    // The alias resolves to the embedding's bytes.
    assert_eq!(
        model.get("decoder/projection/weight").unwrap().name,
        "decoder/embeddings/weight"
    );
    assert!(model.get("decoder/nothing").is_none());
}

#[test]
fn every_truncation_is_a_typed_error() {
    let bytes = small_header_model();
    for len in 0..bytes.len() {
        match Ct2Model::parse(&bytes[..len]) {
            Err(Ct2FormatError::Truncated {
                offset,
                needed,
                available,
                ..
            }) => {
                assert!(offset <= len, "cut at {len}: offset {offset}");
                assert!(needed > available, "cut at {len}: {needed} <= {available}");
            }
            other => panic!("cut at {len}: expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn trailing_bytes_and_bad_sizes_are_corrupt() {
    let mut bytes = small_header_model();
    bytes.push(0);
    assert!(matches!(
        Ct2Model::parse(&bytes),
        Err(Ct2FormatError::Corrupt { .. })
    ));

    let wrong_size = Var {
        name: "w".into(),
        shape: vec![2, 3],
        dtype: F16,
        data: vec![0; 10],
    };
    match Ct2Model::parse(&model_bin("WhisperSpec", &[wrong_size], &[])) {
        Err(Ct2FormatError::SizeMismatch {
            bytes, expected, ..
        }) => assert_eq!((bytes, expected), (10, 12)),
        other => panic!("expected SizeMismatch, got {other:?}"),
    }

    let mut version = small_header_model();
    version[0] = 5;
    assert!(matches!(
        Ct2Model::parse(&version),
        Err(Ct2FormatError::UnsupportedVersion { version: 5 })
    ));
}

#[test]
fn unknown_dtype_is_a_typed_error() {
    let odd = Var {
        name: "encoder/conv1/weight".into(),
        shape: vec![2],
        dtype: 9,
        data: vec![0; 2],
    };
    match Ct2Model::parse(&model_bin("WhisperSpec", &[odd], &[])) {
        Err(e @ Ct2FormatError::UnknownDtype { .. }) => {
            let Ct2FormatError::UnknownDtype { name, code } = &e else {
                unreachable!()
            };
            assert_eq!((name.as_str(), *code), ("encoder/conv1/weight", 9));
            assert!(e.to_string().contains("unknown dtype code 9"), "{e}");
        }
        other => panic!("expected UnknownDtype, got {other:?}"),
    }
}

#[test]
fn splits_stacked_qkv_and_kv_in_ggml_order() {
    let bytes = tiny_whisper(F32);
    let model = Ct2Model::parse(&bytes).unwrap();
    let ckpt = WhisperCheckpoint::from_ct2(&model).unwrap();
    let d = ckpt.dims;
    assert_eq!(
        (
            d.n_vocab,
            d.n_audio_ctx,
            d.n_audio_state,
            d.n_audio_head,
            d.n_audio_layer
        ),
        (5, 3, 4, 2, 1)
    );
    assert_eq!(
        (
            d.n_text_ctx,
            d.n_text_state,
            d.n_text_head,
            d.n_text_layer,
            d.n_mels,
            d.n_ffn
        ),
        (2, 4, 2, 1, 2, 8)
    );
    let names: Vec<&str> = ckpt.tensors.iter().map(|t| t.name.as_str()).collect();
    let attn = |p: &str| {
        [
            "query.weight",
            "query.bias",
            "key.weight",
            "value.weight",
            "value.bias",
            "out.weight",
            "out.bias",
        ]
        .map(|s| format!("{p}.{s}"))
    };
    let mut expected: Vec<String> = [
        "encoder.conv1.weight",
        "encoder.conv1.bias",
        "encoder.conv2.weight",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
    ]
    .map(String::from)
    .to_vec();
    let norm = |p: &str| [format!("{p}.weight"), format!("{p}.bias")];
    let mlp = |b: &str| {
        [
            format!("{b}.mlp.0.weight"),
            format!("{b}.mlp.0.bias"),
            format!("{b}.mlp.2.weight"),
            format!("{b}.mlp.2.bias"),
            format!("{b}.mlp_ln.weight"),
            format!("{b}.mlp_ln.bias"),
        ]
    };
    expected.extend(attn("encoder.blocks.0.attn"));
    expected.extend(norm("encoder.blocks.0.attn_ln"));
    expected.extend(mlp("encoder.blocks.0"));
    expected.extend(norm("encoder.ln_post"));
    expected.push("decoder.token_embedding.weight".into());
    expected.push("decoder.positional_embedding".into());
    expected.extend(attn("decoder.blocks.0.attn"));
    expected.extend(norm("decoder.blocks.0.attn_ln"));
    expected.extend(attn("decoder.blocks.0.cross_attn"));
    expected.extend(norm("decoder.blocks.0.cross_attn_ln"));
    expected.extend(mlp("decoder.blocks.0"));
    expected.extend(norm("decoder.ln"));
    assert_eq!(names, expected);

    let get = |name: &str| {
        ckpt.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let stacked = model
        .get("encoder/layer_0/self_attention/linear_0/weight")
        .unwrap();
    let all = f32s(stacked.data);
    let third = all.len() / 3;
    for (j, part) in ["query", "key", "value"].iter().enumerate() {
        let t = get(&format!("encoder.blocks.0.attn.{part}.weight"));
        assert_eq!(t.shape, vec![4, 4]);
        assert_eq!(t.dtype, FloatType::F32);
        assert_eq!(f32s(t.data), all[j * third..(j + 1) * third]);
    }
    let bias = f32s(
        model
            .get("encoder/layer_0/self_attention/linear_0/bias")
            .unwrap()
            .data,
    );
    assert_eq!(
        f32s(get("encoder.blocks.0.attn.query.bias").data),
        bias[..4]
    );
    assert_eq!(
        f32s(get("encoder.blocks.0.attn.value.bias").data),
        bias[8..]
    );
    assert!(!names.contains(&"encoder.blocks.0.attn.key.bias"));

    let kv = f32s(
        model
            .get("decoder/layer_0/attention/linear_1/weight")
            .unwrap()
            .data,
    );
    assert_eq!(
        f32s(get("decoder.blocks.0.cross_attn.key.weight").data),
        kv[..16]
    );
    assert_eq!(
        f32s(get("decoder.blocks.0.cross_attn.value.weight").data),
        kv[16..]
    );
    assert_eq!(
        get("decoder.blocks.0.cross_attn.value.weight").hf_name,
        "model.decoder.layers.0.encoder_attn.v_proj.weight"
    );
    assert_eq!(
        get("encoder.blocks.0.mlp_ln.bias").hf_name,
        "model.encoder.layers.0.final_layer_norm.bias"
    );
}

#[test]
fn ggml_layout_of_a_tiny_model() {
    let bytes = tiny_whisper(F32);
    let model = Ct2Model::parse(&bytes).unwrap();
    let ckpt = WhisperCheckpoint::from_ct2(&model).unwrap();
    let mel = NpyArray {
        shape: vec![2, 3],
        data: vec![0.5; 6],
    };
    let vocab = vec![b"a".to_vec(), b" bc".to_vec()];
    let mut out = Vec::new();
    write_ggml(&mut out, &ckpt, &mel, &vocab).unwrap();
    let i32_at = |at: usize| i32::from_le_bytes(out[at..at + 4].try_into().unwrap());
    assert_eq!(i32_at(0), 0x6767_6d6c);
    let hparams: Vec<i32> = (1..=11).map(|i| i32_at(4 * i)).collect();
    assert_eq!(hparams, [5, 3, 4, 2, 1, 2, 4, 2, 1, 2, 1]);
    assert_eq!((i32_at(48), i32_at(52)), (2, 3));
    let mut at = 56 + 6 * 4;
    assert_eq!(i32_at(at), 2);
    assert_eq!(&out[at + 8..at + 9], b"a");
    at += 4 + 4 + 1 + 4 + 3;
    // First tensor: conv1.weight, 3-D, f16, dims innermost first.
    assert_eq!((i32_at(at), i32_at(at + 8)), (3, 1));
    assert_eq!(
        (i32_at(at + 12), i32_at(at + 16), i32_at(at + 20)),
        (3, 2, 4)
    );
    let name_len = i32_at(at + 4) as usize;
    assert_eq!(&out[at + 24..at + 24 + name_len], b"encoder.conv1.weight");
    at += 24 + name_len;
    // The f32 source 0.0, 1.0, 2.0, ... as f16.
    assert_eq!(&out[at..at + 6], &[0x00, 0x00, 0x00, 0x3c, 0x00, 0x40]);
    at += 24 * 2;
    // Then conv1.bias as f32 (n, 1), values unchanged.
    assert_eq!((i32_at(at), i32_at(at + 8)), (2, 0));
    assert_eq!((i32_at(at + 12), i32_at(at + 16)), (1, 4));
    let name_len = i32_at(at + 4) as usize;
    at += 20 + name_len;
    assert_eq!(f32s(&out[at..at + 16]), [1000.0, 1001.0, 1002.0, 1003.0]);

    let mut st = Vec::new();
    write_safetensors(&mut st, &ckpt).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(
        header["model.encoder.conv1.bias"]["shape"],
        serde_json::json!([4])
    );
    assert!(header.get("proj_out.weight").is_none());
    assert!(
        header
            .get("model.encoder.layers.0.self_attn.k_proj.bias")
            .is_none()
    );
}

#[test]
fn quantized_weights_and_missing_variables_are_typed_errors() {
    let int8 = tiny_whisper(1);
    let model = Ct2Model::parse(&int8).unwrap();
    match WhisperCheckpoint::from_ct2(&model) {
        Err(ImportError::UnsupportedDtype { name, dtype }) => {
            assert_eq!(name, "encoder/layer_0/self_attention/linear_0/weight");
            assert_eq!(dtype, Ct2DType::I8);
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }

    let bytes = small_header_model();
    let model = Ct2Model::parse(&bytes).unwrap();
    match WhisperCheckpoint::from_ct2(&model) {
        Err(ImportError::MissingVariable { name }) => assert_eq!(name, "encoder/conv1/weight"),
        other => panic!("expected MissingVariable, got {other:?}"),
    }

    let other_spec = model_bin("TransformerSpec", &[], &[]);
    let model = Ct2Model::parse(&other_spec).unwrap();
    assert!(matches!(
        WhisperCheckpoint::from_ct2(&model),
        Err(ImportError::NotWhisper { .. })
    ));
}

// ---------------------------------------------------------------------------
// The real tiny.en

/// The CTranslate2 tiny.en folder and openai-whisper's assets, from
/// `TRIAGE_WHISPER_CT2` and `TRIAGE_WHISPER_ASSETS` (printed by
/// scripts/fetch-whisper-assets). Outside CI a missing folder skips the test
/// loudly; in CI it is a failure.
fn whisper_dirs() -> Option<(PathBuf, PathBuf)> {
    let ct2 = std::env::var_os("TRIAGE_WHISPER_CT2").map(PathBuf::from);
    let assets = std::env::var_os("TRIAGE_WHISPER_ASSETS").map(PathBuf::from);
    match (ct2, assets) {
        (Some(c), Some(a))
            if c.join("model.bin").is_file() && a.join("mel_filters.npz").is_file() =>
        {
            Some((c, a))
        }
        (c, a) => {
            let msg = format!(
                "CTranslate2 Whisper inputs not found (TRIAGE_WHISPER_CT2={c:?}, \
                 TRIAGE_WHISPER_ASSETS={a:?}); run scripts/test, which fetches them"
            );
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

/// Expected checksums of the shipped files, by file name.
fn expected_sums() -> anyhow::Result<Vec<(String, String)>> {
    let Some(shared) = std::env::var_os("TRIAGE_SHARED") else {
        return Ok(vec![
            (GGML_FILE.to_owned(), GGML_SHA256.to_owned()),
            (SAFETENSORS_FILE.to_owned(), SAFETENSORS_SHA256.to_owned()),
        ]);
    };
    let path = Path::new(&shared).join("models/whisper-tiny.en/SHA256SUMS");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // `HASH  NAME`; the safetensors line reads `HASH  (not shipped) model.safetensors`.
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next_back()?.to_owned(), words.next()?.to_owned()))
        })
        .collect())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[test]
fn tiny_en_converts_byte_for_byte() -> anyhow::Result<()> {
    let Some((model_dir, assets_dir)) = whisper_dirs() else {
        return Ok(());
    };
    let out = tempfile::tempdir()?;
    let report = import_ct2(&ImportOptions {
        model_dir,
        assets_dir,
        out_dir: out.path().to_owned(),
        safetensors: true,
    })?;
    assert_eq!(report.dims.n_vocab, 51864);
    assert_eq!(report.dtype, FloatType::F16);
    let sums = expected_sums()?;
    let expected = |name: &str| {
        sums.iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| anyhow::anyhow!("no checksum for {name}"))
    };
    assert_eq!(
        sha256_file(&out.path().join(GGML_FILE))?,
        expected(GGML_FILE)?,
        "{GGML_FILE} differs from the shipped whisper.cpp file"
    );
    assert_eq!(
        sha256_file(&out.path().join(SAFETENSORS_FILE))?,
        expected(SAFETENSORS_FILE)?,
        "{SAFETENSORS_FILE} differs from the reference conversion"
    );
    // The folder's other files match the shipped ones where SHA256SUMS lists them.
    for name in ["config.json", "tokenizer.json", "melfilters.bytes"] {
        if let Ok(want) = expected(name) {
            assert_eq!(sha256_file(&out.path().join(name))?, want, "{name}");
        }
    }
    Ok(())
}

#[test]
fn missing_assets_name_the_fix() -> anyhow::Result<()> {
    let Some((model_dir, _)) = whisper_dirs() else {
        return Ok(());
    };
    let empty = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let err = import_ct2(&ImportOptions {
        model_dir,
        assets_dir: empty.path().to_owned(),
        out_dir: out.path().to_owned(),
        safetensors: false,
    })
    .unwrap_err();
    assert!(
        matches!(&err, ImportError::MissingInput { path, .. } if path.ends_with("mel_filters.npz")),
        "{err:?}"
    );
    assert!(err.to_string().contains("--assets"), "{err}");
    assert!(!out.path().join(GGML_FILE).exists());
    Ok(())
}
