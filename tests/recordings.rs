//! Recording parsing: good lines in order, bad lines reported with their line number.

use edgemt::stream::sample::DecodeError;
use edgemt::stream::{Recording, SampleDecoder};

fn decoder() -> SampleDecoder {
    SampleDecoder::new(&[2, 3], 4)
}

#[test]
fn flat_and_nested_samples_with_optional_fields_are_read() {
    let text = r#"{"x": [1, 2, 3, 4, 5, 6], "label": 3, "truth": 3, "ts": 12.5}

{"x": [[1, 2, 3], [4, 5, 6]]}
{"x": [0, 0, 0, 0, 0, 0.5], "truth": 0, "id": "a7", "extra": "ignored"}
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
