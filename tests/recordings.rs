//! Recording parsing: good lines in order, bad lines reported with their line number.

use edgemt::stream::sample::DecodeError;
use edgemt::stream::{Recording, SampleDecoder};

fn decoder() -> SampleDecoder {
    SampleDecoder::new(&[2, 3], 4)
}

/// A typo must not make a labeled sample an unlabeled one: the line is refused, naming the
/// field, the line and the known field it probably meant; `--allow-unknown-fields` (the
/// decoder's `allow_unknown_fields`) takes the line and ignores the field.
#[test]
fn an_unknown_field_in_a_recording_is_refused_by_name_with_its_line() {
    let text = "{\"x\": [1, 2, 3, 4, 5, 6], \"label\": 1}\n\
                {\"x\": [1, 2, 3, 4, 5, 6], \"lable\": 3}\n\
                {\"x\": [1, 2, 3, 4, 5, 6], \"site\": \"kitchen\"}\n\
                {\"id\": \"s1\", \"lable\": 3}\n";
    let rec = Recording::parse(text, &decoder());
    assert_eq!(rec.samples.len(), 1, "{:?}", rec.samples);
    let refused: Vec<(usize, String)> = rec
        .rejected
        .iter()
        .map(|r| (r.line, r.error.to_string()))
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(refused[0].0, 2);
    assert!(
        refused[0]
            .1
            .starts_with("unknown field \"lable\", did you mean \"label\"?"),
        "{}",
        refused[0].1
    );
    assert!(
        refused[0].1.contains("--allow-unknown-fields"),
        "{}",
        refused[0].1
    );
    assert_eq!(refused[1].0, 3);
    assert!(
        refused[1].1.starts_with("unknown field \"site\" ("),
        "{}",
        refused[1].1
    );
    assert_eq!(refused[2].0, 4, "feedback lines too");
    assert!(refused[2].1.contains("\"lable\""), "{}", refused[2].1);

    let lenient = Recording::parse(text, &decoder().allowing_unknown_fields());
    assert_eq!(lenient.samples.len(), 3);
    assert_eq!(
        lenient.samples[1].label, None,
        "the typo is ignored, as asked"
    );
}

/// Through the command line: a replay says which line and which field, and the flag lets
/// the recording through.
#[test]
fn replay_names_an_unknown_field_and_takes_it_with_allow_unknown_fields() {
    let dir = crate::util::tempdir();
    let text = std::fs::read_to_string(crate::util::path("data/target_stream.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().take(40).map(String::from).collect();
    lines[4] = lines[4].replacen("\"truth\"", "\"truht\"", 1);
    let rec = dir.path().join("typo.jsonl");
    std::fs::write(&rec, lines.join("\n") + "\n").unwrap();
    let cfg = crate::util::path("config/edgemt.toml");
    let run = |extra: &[&str]| {
        crate::util::edgemt()
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg(&rec)
            .args(extra)
            .output()
            .unwrap()
    };
    let strict = run(&[]);
    assert!(strict.status.success());
    let said = String::from_utf8_lossy(&strict.stderr);
    assert!(
        said.contains("typo.jsonl:5: skipped: unknown field \"truht\", did you mean \"truth\"?"),
        "{said}"
    );
    assert!(String::from_utf8_lossy(&strict.stdout).contains("samples 39 ("));
    let lenient = run(&["--allow-unknown-fields"]);
    assert!(lenient.status.success());
    assert!(!String::from_utf8_lossy(&lenient.stderr).contains("truht"));
    assert!(String::from_utf8_lossy(&lenient.stdout).contains("samples 40 ("));
}

#[test]
fn flat_and_nested_samples_with_optional_fields_are_read() {
    let text = r#"{"x": [1, 2, 3, 4, 5, 6], "label": 3, "truth": 3, "ts": 12.5}

{"x": [[1, 2, 3], [4, 5, 6]]}
{"x": [0, 0, 0, 0, 0, 0.5], "truth": 0, "id": "a7", "meta": {"site": "ignored"}}
"#;
    let rec = Recording::parse(text, &decoder());
    assert!(rec.rejected.is_empty(), "{:?}", rec.rejected);
    assert_eq!(rec.samples.len(), 3, "the blank line is skipped");
    assert_eq!(rec.samples[0].label, Some(3));
    assert_eq!(rec.samples[0].ts, Some(12.5));
    assert_eq!(
        rec.samples[1].x, rec.samples[0].x,
        "nested equals flat in row-major order"
    );
    assert_eq!(rec.samples[1].label, None);
    assert_eq!(rec.samples[2].id.as_deref(), Some("a7"));
}

#[test]
fn every_kind_of_bad_line_is_reported_with_its_line_number_and_skipped() {
    let text = [
        r#"{"x": [1, 2, 3, 4, 5, 6]}"#,              // 1 ok
        r#"not json"#,                               // 2
        r#"{"x": [1, 2, 3]}"#,                       // 3 wrong length
        r#"{"x": [1, 2, 3, 4, 5, NaN]}"#,            // 4 NaN is not JSON
        r#"{"x": [1, 2, 3, 4, 5, 1e40]}"#,           // 5 overflows f32
        r#"{"x": [1, 2, 3, 4, 5, 6], "label": 4}"#,  // 6 class out of range
        r#"{"x": [1, 2, 3, 4, 5, 6], "truth": -1}"#, // 7 class out of range
        r#"{"y": [1]}"#,                             // 8 no x
        r#"{"x": [[1, 2], [3, 4], [5, 6]]}"#,        // 9 nested, wrong shape
        r#"{"x": [1, 2, "3", 4, 5, 6]}"#,            // 10 not a number
        r#"[1, 2, 3]"#,                              // 11 not an object
        r#"{"x": [1, 2, 3, 4, 5, 6], "label": 1}"#,  // 12 ok
    ]
    .join("\n");
    let rec = Recording::parse(&text, &decoder());
    assert_eq!(rec.samples.len(), 2);
    let lines: Vec<usize> = rec.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert!(matches!(rec.rejected[0].error, DecodeError::NotJson(_)));
    assert!(matches!(
        rec.rejected[1].error,
        DecodeError::WrongLength {
            got: 3,
            expected: 6,
            ..
        }
    ));
    assert!(matches!(rec.rejected[3].error, DecodeError::NonFinite(5)));
    assert!(matches!(
        rec.rejected[4].error,
        DecodeError::ClassOutOfRange { field: "label", .. }
    ));
    assert!(matches!(
        rec.rejected[5].error,
        DecodeError::ClassOutOfRange { field: "truth", .. }
    ));
    assert_eq!(rec.rejected[6].error, DecodeError::MissingX);
    assert!(rec.rejected[1].error.to_string().contains("expected 6"));
}

#[test]
fn raw_values_are_checked_for_length_and_finiteness() {
    let d = decoder();
    assert!(d.check_values(&[0.0; 6]).is_ok());
    assert!(matches!(
        d.check_values(&[0.0; 5]),
        Err(DecodeError::WrongLength { .. })
    ));
    assert_eq!(
        d.check_values(&[0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0]),
        Err(DecodeError::NonFinite(2))
    );
}

#[test]
fn the_shipped_recordings_parse_cleanly_with_at_most_five_percent_labeled() {
    let d = SampleDecoder::new(&[64, 6], 6);
    for name in [
        "target_stream",
        "control_stream",
        "target_holdout",
        "control_holdout",
    ] {
        let rec = Recording::read(&crate::util::path(&format!("data/{name}.jsonl")), &d).unwrap();
        assert!(
            rec.rejected.is_empty(),
            "{name}: {:?}",
            rec.rejected.first()
        );
        assert!(rec.samples.len() > 300, "{name}");
        assert!(
            rec.samples.iter().all(|s| s.truth.is_some()),
            "{name}: all scored"
        );
        let labeled = rec.samples.iter().filter(|s| s.label.is_some()).count();
        assert!(
            labeled as f64 <= 0.05 * rec.samples.len() as f64,
            "{name}: {labeled} labeled"
        );
        if name.ends_with("stream") {
            assert!(labeled > 0, "{name} carries some labels");
        }
    }
}
