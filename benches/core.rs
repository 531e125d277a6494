//! Criterion benches for the hot paths: backbone inference at batch 1 and 32, the teacher
//! head, and one student train step (pseudo-labels, two augmented backbone passes, update).
//! Run with `cargo bench --bench core`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgemt::learn::{LearnConfig, Learner};
use edgemt::model::{Classifier, HeadSelection};
use edgemt::nn::Workspace;
use edgemt::stream::{Layout, Recording, SampleDecoder};
use ndarray::Array2;

fn shipped() -> (Classifier, Recording) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let c = Classifier::load(
        &root.join("models/hapt_mlp.onnx"),
        &HeadSelection::default(),
    )
    .expect("model");
    let rec = Recording::read(
        &root.join("data/target_stream.jsonl"),
        &SampleDecoder::new(&c.input_shape, c.classes()),
    )
    .expect("recording");
    (c, rec)
}

fn backbone(c: &mut Criterion) {
    let (mut model, rec) = shipped();
    let mut group = c.benchmark_group("backbone");
    for batch in [1usize, 32] {
        let inputs: Vec<f32> = rec.samples[..batch]
            .iter()
            .flat_map(|s| s.x.iter().copied())
            .collect();
        let mut out = Array2::zeros((batch, model.embedding_dim));
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                model
                    .backbone
                    .embed_into(black_box(&inputs), batch, &mut out)
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn teacher_head(c: &mut Criterion) {
    let (mut model, rec) = shipped();
    let inputs: Vec<f32> = rec.samples[..32]
        .iter()
        .flat_map(|s| s.x.iter().copied())
        .collect();
    let emb = model.backbone.embed(&inputs, 32).unwrap();
    let head = model.pretrained();
    let mut out = Array2::zeros((1, model.classes()));
    let mut ws = Workspace::default();
    c.bench_function("teacher_head/1", |b| {
        b.iter(|| {
            head.probs_into(
                black_box(emb.slice(ndarray::s![0..1, ..])),
                &mut ws,
                &mut out,
            )
        })
    });
}

fn train_step(c: &mut Criterion) {
    let (mut model, rec) = shipped();
    let mut learner = Learner::new(
        model.pretrained(),
        Layout::for_shape(&model.input_shape, None),
        &LearnConfig::default(),
        &Default::default(),
        &Default::default(),
        &Default::default(),
        &Default::default(),
        0,
    );
    // Fill the buffers from the recording, as a replay would.
    for chunk in rec.samples.chunks(32) {
        let inputs: Vec<f32> = chunk.iter().flat_map(|s| s.x.iter().copied()).collect();
        let emb = model.backbone.embed(&inputs, chunk.len()).unwrap();
        for (i, s) in chunk.iter().enumerate() {
            learner.observe(&s.x, emb.row(i), s.label, s.truth);
        }
    }
    let mut backbone = model.backbone.clone();
    c.bench_function("train_step", |b| {
        b.iter(|| learner.step(&mut backbone).unwrap())
    });
}

criterion_group!(benches, backbone, teacher_head, train_step);
criterion_main!(benches);
