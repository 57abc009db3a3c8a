//! Config validation: the shipped examples load without API keys, and every
//! mistake is reported with its TOML key and a fix.

use std::path::Path;
use triage_engine::Config;
use triage_engine::config::{ConfigError, Problem, bind_named};

fn problems(toml: &str) -> Vec<Problem> {
    match Config::from_toml(toml, "test.toml", Path::new("/tmp")) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(e) => panic!("expected validation problems, got {e}"),
        Ok(_) => panic!("expected validation problems, got a valid config"),
    }
}

fn keys(toml: &str) -> Vec<String> {
    problems(toml).into_iter().map(|p| p.key).collect()
}

#[test]
fn shipped_examples_load_without_any_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in [
        "moderation.toml",
        "support-router.toml",
        "meeting-notes.toml",
    ] {
        let config = Config::load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!config.tasks.is_empty(), "{name}");
        if std::env::var_os("OPENAI_API_KEY").is_none() {
            assert!(
                config.warnings.iter().any(|w| w.contains("OPENAI_API_KEY")),
                "{name}: {:?}",
                config.warnings
            );
        }
    }
}

const PROVIDER: &str =
    "[providers.openai]\nkind = \"openai\"\napi_key_env = \"TRIAGE_TEST_NO_SUCH_KEY\"\n";

#[test]
fn unknown_names_are_reported_with_their_key_and_the_choices() {
    let p = problems(&format!(
        "{PROVIDER}[tasks.m]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\"]\n\
         [[tasks.m.tiers]]\nname = \"a\"\nlocal = \"toxicity\"\nhi = 0.9\nlo = 0.1\n\
         [[tasks.m.tiers]]\nname = \"b\"\nprovider = \"opneai\"\nmodel = \"gpt-4o-mini\"\n"
    ));
    let unknown_local = p
        .iter()
        .find(|p| p.key == "tasks.m.tiers[0].local")
        .unwrap();
    assert!(
        unknown_local.message.contains("toxicity")
            && unknown_local.fix.contains("[local.toxicity]"),
        "{unknown_local}"
    );
    let typo = p
        .iter()
        .find(|p| p.key == "tasks.m.tiers[1].provider")
        .unwrap();
    assert!(typo.fix.contains("openai"), "{typo}");
}

#[test]
fn bands_labels_and_maps_are_checked() {
    let base = format!("{PROVIDER}[local.tox]\nmodel = \"toxicity\"\n");
    let k = keys(&format!(
        "{base}[tasks.m]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\"]\n\
         [[tasks.m.tiers]]\nname = \"a\"\nlocal = \"tox\"\nhi = 0.2\nlo = 0.8\n\
         [[tasks.m.tiers]]\nname = \"b\"\nprovider = \"openai\"\nmodel = \"m\"\noperation = \"moderation\"\nmap = {{ hate = \"hateful\" }}\n\
         [[tasks.m.tiers]]\nname = \"c\"\nprovider = \"openai\"\nmodel = \"m\"\n"
    ));
    assert!(k.contains(&"tasks.m.tiers[0]".to_owned()), "{k:?}");
    assert!(
        k.contains(&"tasks.m.tiers[1]".to_owned()),
        "a middle tier without a band: {k:?}"
    );
    assert!(k.contains(&"tasks.m.tiers[1].map".to_owned()), "{k:?}");
    let none = keys(&format!(
        "{base}[tasks.m]\nstrategy = \"cascade\"\nkind = \"moderation\"\ntiers = []\n"
    ));
    assert!(
        none.contains(&"tasks.m.labels".to_owned()) && none.contains(&"tasks.m.tiers".to_owned()),
        "{none:?}"
    );
}

#[test]
fn per_label_bands_are_checked_and_read() {
    let base = format!(
        "{PROVIDER}[local.tox]\nmodel = \"toxicity\"\n\
         [tasks.m]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\", \"insult\"]\n"
    );
    let last = "[[tasks.m.tiers]]\nname = \"c\"\nprovider = \"openai\"\nmodel = \"m\"\n";
    let k = keys(&format!(
        "{base}[[tasks.m.tiers]]\nname = \"a\"\nlocal = \"tox\"\n\
         bands = {{ toxic = {{ lo = 0.7, hi = 0.2 }}, spam = {{ lo = 0.1, hi = 0.9 }} }}\n{last}"
    ));
    assert!(
        k.contains(&"tasks.m.tiers[0].bands.toxic".to_owned()),
        "{k:?}"
    );
    assert!(
        k.contains(&"tasks.m.tiers[0].bands.spam".to_owned()),
        "{k:?}"
    );
    // Bands for only some labels need the tier's lo/hi for the others.
    assert!(
        keys(&format!(
            "{base}[[tasks.m.tiers]]\nname = \"a\"\nlocal = \"tox\"\n\
             bands = {{ toxic = {{ lo = 0.1, hi = 0.9 }} }}\n{last}"
        ))
        .contains(&"tasks.m.tiers[0]".to_owned())
    );
    // Bands for every label stand alone; with lo/hi they override them.
    for tier in [
        "bands = { toxic = { lo = 0.1, hi = 0.9 }, insult = { lo = 0.3, hi = 0.6 } }\n",
        "lo = 0.2\nhi = 0.8\nbands = { insult = { lo = 0.3, hi = 0.6 } }\n",
    ] {
        let config = Config::from_toml(
            &format!("{base}[[tasks.m.tiers]]\nname = \"a\"\nlocal = \"tox\"\n{tier}{last}"),
            "test.toml",
            Path::new("/tmp"),
        )
        .unwrap_or_else(|e| panic!("{tier}: {e}"));
        let triage_engine::config::Strategy::Cascade(c) = &config.tasks["m"].strategy else {
            panic!("not a cascade")
        };
        let t = &c.tiers[0];
        assert_eq!(t.band_for("insult"), Some((0.3, 0.6)), "{tier}");
        assert!(t.band_for("toxic").is_some());
        assert_eq!(
            c.tiers[1].band_for("insult"),
            None,
            "the last tier always answers"
        );
    }
}

#[test]
fn pipeline_stage_types_must_line_up() {
    let k = keys(
        "[local.ner]\nmodel = \"ner\"\n[local.whisper]\nmodel = \"x.bin\"\nkind = \"whisper\"\n\
         [tasks.p]\nstrategy = \"pipeline\"\n\
         [[tasks.p.stages]]\nname = \"e\"\nkind = \"entities\"\nlocal = \"ner\"\n\
         [[tasks.p.stages]]\nname = \"t\"\nkind = \"transcribe\"\nlocal = \"whisper\"\n\
         [[tasks.p.stages]]\nname = \"x\"\nkind = \"dance\"\n",
    );
    assert!(
        k.contains(&"tasks.p.stages[1]".to_owned()),
        "audio after text: {k:?}"
    );
    assert!(k.contains(&"tasks.p.stages[2].kind".to_owned()), "{k:?}");
}

#[test]
fn router_parameters_must_be_extracted_fields() {
    let p = problems(
        "[tasks.r]\nstrategy = \"router\"\n\
         [tasks.r.intent]\nkind = \"rules\"\ndefault = \"faq\"\nrules = [{ route = \"refund\", any = [\"refund\"] }]\n\
         [[tasks.r.extract]]\nfield = \"order_id\"\nregex = \"#(\\\\d+)\"\n\
         [tasks.r.retrieve]\ndatabase = \"sqlite://orders.db\"\nquery = \"SELECT * FROM orders WHERE id = :order AND x::text = 'a'\"\n\
         [tasks.r.routes.faq]\nhandler = \"template\"\ntemplate = \"See our FAQ.\"\n",
    );
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"tasks.r.retrieve.query"), "{p:?}");
    assert!(keys.contains(&"tasks.r.intent.rules[0].route"), "{p:?}");
}

#[test]
fn unknown_fields_and_bad_toml_are_parse_errors() {
    let e = Config::from_toml(
        "[tasks.m]\nstrategy = \"cascade\"\nkinds = \"x\"\n",
        "t.toml",
        Path::new("."),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }));
    let chain = triage_engine::error::chain(&e);
    assert!(chain.contains("kinds"), "{chain}");
    let e = Config::from_toml("[tasks.m\n", "t.toml", Path::new(".")).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }));
    let e = Config::from_toml(
        "[tasks.m]\nstrategy = \"carousel\"\n",
        "t.toml",
        Path::new("."),
    )
    .unwrap_err();
    assert!(triage_engine::error::chain(&e).contains("carousel"));
}

#[test]
fn named_parameters_become_numbered_ones() {
    let (q, names) = bind_named(
        "SELECT a FROM t WHERE id = :order_id AND b = :x OR id = :order_id AND c::text = 'y'",
    );
    assert_eq!(
        q,
        "SELECT a FROM t WHERE id = $1 AND b = $2 OR id = $1 AND c::text = 'y'"
    );
    assert_eq!(names, vec!["order_id", "x"]);
}

#[test]
fn a_provider_needs_its_key_variable_named_and_a_url() {
    let k = keys(
        "[providers.a]\nkind = \"anthropic\"\n[providers.b]\nkind = \"openai_compatible\"\n[providers.c]\nkind = \"openai_compatible\"\nbase_url = \"ftp://x\"\n",
    );
    assert_eq!(
        k,
        vec![
            "providers.a.api_key_env",
            "providers.b.base_url",
            "providers.c.base_url"
        ]
    );
}

#[test]
fn a_specialist_on_a_gpu_gets_gpu_batches_and_each_limit_can_be_set() -> anyhow::Result<()> {
    let config = Config::from_toml(
        "[local.gpu]\nmodel = \"toxicity\"\nkind = \"classifier\"\ndevice = \"cuda:1\"\n\
         [local.cpu]\nmodel = \"toxicity\"\nkind = \"classifier\"\n\
         [local.tuned]\nmodel = \"toxicity\"\nkind = \"classifier\"\ndevice = \"cuda\"\n\
         max_batch_size = 64\nmax_pass_tokens = 4096\n",
        "test.toml",
        Path::new("/tmp"),
    )?;
    let gpu = &config.local["gpu"];
    assert_eq!(gpu.device, triage_local::DeviceSpec::Cuda(1));
    assert_eq!(gpu.batch, triage_local::BatchConfig::for_device(true));
    assert!(gpu.batch.max_batch_size > config.local["cpu"].batch.max_batch_size);
    assert!(gpu.batch.max_pass_tokens > config.local["cpu"].batch.max_pass_tokens);
    // The shipped toxicity specialist runs in int8 on the CPU (not on a GPU).
    assert_eq!(
        config.local["cpu"].batch,
        triage_local::BatchConfig {
            int8: true,
            ..triage_local::BatchConfig::default()
        }
    );
    assert!(!gpu.batch.int8);
    let tuned = &config.local["tuned"].batch;
    assert_eq!((tuned.max_batch_size, tuned.max_pass_tokens), (64, 4096));
    assert_eq!(tuned.max_batch_tokens, 65_536);
    assert!(
        keys("[local.t]\nmodel = \"toxicity\"\nkind = \"classifier\"\nmax_pass_tokens = 0\n")
            .contains(&"local.t.max_pass_tokens".to_string())
    );
    Ok(())
}

#[test]
fn int8_weights_are_a_cpu_setting() -> anyhow::Result<()> {
    let config = Config::from_toml(
        "[local.t]\nmodel = \"toxicity\"\nkind = \"classifier\"\nint8 = true\n\
         [local.f]\nmodel = \"toxicity\"\nkind = \"classifier\"\nint8 = false\n",
        "test.toml",
        Path::new("/tmp"),
    )?;
    assert!(config.local["t"].batch.int8);
    assert!(
        !config.local["f"].batch.int8,
        "int8 = false wins over the default"
    );
    let p = problems(
        "[local.g]\nmodel = \"toxicity\"\nkind = \"classifier\"\ndevice = \"cuda:0\"\nint8 = true\n",
    );
    let int8 = p.iter().find(|p| p.key == "local.g.int8");
    assert!(
        int8.is_some_and(|p| p.message.contains("CPU") && p.fix.contains("device")),
        "{p:?}"
    );
    Ok(())
}

#[test]
fn only_a_whisper_specialist_takes_a_speaker_model() -> anyhow::Result<()> {
    let config = Config::from_toml(
        "[local.w]\nmodel = \"./tiny.bin\"\nkind = \"whisper\"\nspeaker_model = \"./spk.pt\"\n\
         [local.d]\nmodel = \"./tiny.bin\"\nkind = \"whisper\"\nspeaker_model = \"default\"\n",
        "test.toml",
        Path::new("/etc/triage"),
    )?;
    // A relative file is read from the config's folder; `default` is kept.
    assert_eq!(
        config.local["w"].speaker_model.as_deref(),
        Some("/etc/triage/./spk.pt")
    );
    assert_eq!(config.local["d"].speaker_model.as_deref(), Some("default"));
    let p = problems(
        "[local.t]\nmodel = \"toxicity\"\nkind = \"classifier\"\nspeaker_model = \"default\"\n",
    );
    let found = p.iter().find(|p| p.key == "local.t.speaker_model");
    assert!(
        found.is_some_and(|p| p.message.contains("Whisper") && p.fix.contains("kind")),
        "{p:?}"
    );
    Ok(())
}
