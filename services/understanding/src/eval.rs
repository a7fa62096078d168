//! `moltbot-understanding eval HEAD DATA` (and `moltbot intents eval`):
//! scores a trained head on labelled data the way the service classifies
//! (the head's own encoder, its out-of-scope rule and the cascade), and
//! writes the figures as JSON and a readable table.
//!
//! Figures ([`Report`]): accuracy over every text (out of scope counts as
//! a label), in-scope accuracy (right intent and not flagged), the intent
//! head's accuracy before the out-of-scope rule, out-of-scope recall and
//! precision, domain accuracy, per-intent precision/recall/F1 (macro F1
//! over in-scope intents) and the most frequent confusion pairs. Texts
//! whose label the head does not know count as out of scope (so data with
//! held-out intents measures open-intent detection directly).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Instant,
};

use moltbot_encoder::{Encoder, Precision};
use serde::Serialize;

use crate::{
    dataset::{self, Format, OOS},
    head::IntentHead,
};

/// Flags of `moltbot-understanding eval`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "moltbot-understanding eval",
    about = "Score a trained intent head on labelled data"
)]
pub struct EvalArgs {
    /// The head directory (from `train`).
    pub head: PathBuf,
    /// Labelled data in any format `train` reads; CLINC150 JSON is scored
    /// on its `test` + `oos_test` when it has them.
    pub data: PathBuf,
    /// The data's format; default: by its extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// The label out-of-scope rows carry in the data.
    #[arg(long, default_value = "oos")]
    pub oos_label: String,
    /// Where to write the JSON report; default: `<HEAD>/eval-<data stem>.json`.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The base sentence encoder directory (the cascade's second opinion,
    /// and the encoder of heads trained without fine-tuning).
    /// Default: `<models dir>/all-minilm-l6-v2`.
    #[arg(long, env = "MOLTBOT_ENCODER_DIR")]
    pub encoder_dir: Option<PathBuf>,
    /// Arithmetic of the embeddings, as the service runs
    /// (`MOLTBOT_ENCODER_PRECISION`).
    #[arg(
        long,
        env = "MOLTBOT_ENCODER_PRECISION",
        default_value = "auto",
        value_parser = Precision::parse_cpu
    )]
    pub precision: Precision,
    /// libtorch threads; 0: every core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Models directory (`make models`).
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: PathBuf,
    /// Confusion pairs and weakest intents shown in the table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

/// One intent's figures.
#[derive(Debug, Clone, Serialize)]
pub struct IntentScore {
    /// The intent (`oos` for out of scope).
    pub intent: String,
    /// Texts labelled with it.
    pub support: usize,
    /// Share of texts predicted as it that are labelled with it.
    pub precision: f64,
    /// Share of texts labelled with it that are predicted as it.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
}

/// A frequent mistake.
#[derive(Debug, Clone, Serialize)]
pub struct Confusion {
    /// The label.
    pub expected: String,
    /// What the head said.
    pub predicted: String,
    /// How often.
    pub count: usize,
}

/// What `eval` measured (written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The head's model id.
    pub model_id: String,
    /// The data file.
    pub data: String,
    /// Texts scored.
    pub texts: usize,
    /// Of them labelled with an intent the head knows.
    pub in_scope_texts: usize,
    /// Of them labelled out of scope, or with an intent the head does not
    /// know.
    pub out_of_scope_texts: usize,
    /// Of those, texts whose intent the head does not know.
    pub unknown_intent_texts: usize,
    /// Predicted label (out of scope included) equals the label, over all
    /// texts.
    pub accuracy: f64,
    /// In-scope texts with the right intent and not flagged out of scope.
    pub in_scope_accuracy: f64,
    /// In-scope texts whose most probable in-scope intent is right,
    /// whatever the out-of-scope rule says.
    pub intent_accuracy_before_rule: f64,
    /// Out-of-scope texts flagged (`None`: the data has none).
    pub out_of_scope_recall: Option<f64>,
    /// Flagged texts that are out of scope (`None`: nothing flagged).
    pub out_of_scope_precision: Option<f64>,
    /// In-scope texts with the right domain (from the data's domain, or
    /// the head's domain of the labelled intent).
    pub domain_accuracy: Option<f64>,
    /// Mean F1 over the in-scope intents.
    pub macro_f1: f64,
    /// Every label's figures, weakest F1 first.
    pub per_intent: Vec<IntentScore>,
    /// Every mistake (expected, predicted) with its count, most frequent
    /// first.
    pub confusions: Vec<Confusion>,
    /// Texts classified per second (embedding included).
    pub texts_per_second: f64,
}

/// One scored text: label, prediction, best in-scope intent, domains.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The label (`oos` for out of scope or unknown intents).
    pub expected: String,
    /// The prediction (`oos` when flagged).
    pub predicted: String,
    /// The most probable in-scope intent.
    pub best_intent: String,
    /// The expected domain, when known.
    pub expected_domain: Option<String>,
    /// The predicted domain.
    pub predicted_domain: String,
}

fn share(n: usize, d: usize) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

/// Figures of scored texts; `top` confusion pairs are kept.
pub fn report(outcomes: &[Outcome], unknown: usize, top: usize) -> Report {
    let in_scope: Vec<&Outcome> = outcomes.iter().filter(|o| o.expected != OOS).collect();
    let oos: Vec<&Outcome> = outcomes.iter().filter(|o| o.expected == OOS).collect();
    let flagged = outcomes.iter().filter(|o| o.predicted == OOS).count();
    let caught = oos.iter().filter(|o| o.predicted == OOS).count();
    let with_domain: Vec<&&Outcome> = in_scope
        .iter()
        .filter(|o| o.expected_domain.is_some())
        .collect();
    let mut counts: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new(); // support, predicted, right
    let mut confusions: HashMap<(&str, &str), usize> = HashMap::new();
    for o in outcomes {
        counts.entry(&o.expected).or_default().0 += 1;
        counts.entry(&o.predicted).or_default().1 += 1;
        if o.expected == o.predicted {
            counts.entry(&o.expected).or_default().2 += 1;
        } else {
            *confusions.entry((&o.expected, &o.predicted)).or_default() += 1;
        }
    }
    let mut per_intent: Vec<IntentScore> = counts
        .iter()
        .filter(|(_, (support, _, _))| *support > 0)
        .map(|(intent, &(support, predicted, right))| {
            let (p, r) = (share(right, predicted), share(right, support));
            IntentScore {
                intent: (*intent).to_owned(),
                support,
                precision: p,
                recall: r,
                f1: if p + r > 0.0 {
                    2.0 * p * r / (p + r)
                } else {
                    0.0
                },
            }
        })
        .collect();
    per_intent.sort_by(|a, b| a.f1.total_cmp(&b.f1).then(a.intent.cmp(&b.intent)));
    let in_scope_f1: Vec<f64> = per_intent
        .iter()
        .filter(|s| s.intent != OOS)
        .map(|s| s.f1)
        .collect();
    let mut confusions: Vec<Confusion> = confusions
        .into_iter()
        .map(|((e, p), count)| Confusion {
            expected: e.to_owned(),
            predicted: p.to_owned(),
            count,
        })
        .collect();
    confusions.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.expected.cmp(&b.expected))
            .then_with(|| a.predicted.cmp(&b.predicted))
    });
    confusions.truncate(top);
    Report {
        model_id: String::new(),
        data: String::new(),
        texts: outcomes.len(),
        in_scope_texts: in_scope.len(),
        out_of_scope_texts: oos.len(),
        unknown_intent_texts: unknown,
        accuracy: share(
            outcomes
                .iter()
                .filter(|o| o.expected == o.predicted)
                .count(),
            outcomes.len(),
        ),
        in_scope_accuracy: share(
            in_scope
                .iter()
                .filter(|o| o.predicted == o.expected)
                .count(),
            in_scope.len(),
        ),
        intent_accuracy_before_rule: share(
            in_scope
                .iter()
                .filter(|o| o.best_intent == o.expected)
                .count(),
            in_scope.len(),
        ),
        out_of_scope_recall: (!oos.is_empty()).then(|| share(caught, oos.len())),
        out_of_scope_precision: (flagged > 0).then(|| share(caught, flagged)),
        domain_accuracy: (!with_domain.is_empty()).then(|| {
            share(
                with_domain
                    .iter()
                    .filter(|o| o.expected_domain.as_deref() == Some(o.predicted_domain.as_str()))
                    .count(),
                with_domain.len(),
            )
        }),
        macro_f1: in_scope_f1.iter().sum::<f64>() / in_scope_f1.len().max(1) as f64,
        per_intent,
        confusions,
        texts_per_second: 0.0,
    }
}

/// The report as a readable table: headline figures, the `top` weakest
/// intents and the confusion pairs.
pub fn table(r: &Report, top: usize) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
    let mut out = format!(
        "{} on {}: {} texts ({} in scope, {} out of scope, {} of them with intents the head does not know)\n\
         accuracy                     {:.4}\n\
         in-scope accuracy            {:.4}\n\
         intent accuracy before rule  {:.4}\n\
         out-of-scope recall          {}\n\
         out-of-scope precision       {}\n\
         domain accuracy              {}\n\
         macro F1 (in scope)          {:.4}\n\
         texts/s                      {:.0}\n",
        r.model_id,
        r.data,
        r.texts,
        r.in_scope_texts,
        r.out_of_scope_texts,
        r.unknown_intent_texts,
        r.accuracy,
        r.in_scope_accuracy,
        r.intent_accuracy_before_rule,
        opt(r.out_of_scope_recall),
        opt(r.out_of_scope_precision),
        opt(r.domain_accuracy),
        r.macro_f1,
        r.texts_per_second,
    );
    out += &format!(
        "\n{:<40} {:>7} {:>9} {:>7} {:>7}\n",
        "weakest intents", "support", "precision", "recall", "F1"
    );
    for s in r.per_intent.iter().take(top) {
        out += &format!(
            "{:<40} {:>7} {:>9.3} {:>7.3} {:>7.3}\n",
            s.intent, s.support, s.precision, s.recall, s.f1
        );
    }
    out += &format!("\n{:<40} {:<40} {:>5}\n", "expected", "predicted", "count");
    for c in r.confusions.iter().take(top) {
        out += &format!("{:<40} {:<40} {:>5}\n", c.expected, c.predicted, c.count);
    }
    out
}

/// Runs `eval`: classifies every text of the data and writes the report.
/// Errors with a message naming what is wrong.
pub fn run(args: &EvalArgs) -> Result<Report, String> {
    crate::train::set_threads(args.threads);
    let device = tch::Device::Cpu;
    let base = Encoder::load_with(
        &crate::encoder_dir(&args.models_dir, args.encoder_dir.as_deref()),
        device,
        args.precision,
    )
    .map_err(|e| e.to_string())?;
    let head = IntentHead::load(&args.head, base.dimension()).map_err(|e| e.to_string())?;
    let tuned = match head.encoder_dir() {
        Some(dir) => {
            Some(Encoder::load_with(&dir, device, args.precision).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let encoder = tuned.as_ref().unwrap_or(&base);
    let rows =
        dataset::load_rows(&args.data, args.format, &args.oos_label).map_err(|e| e.to_string())?;
    let labels = head.labels();
    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut unknown = 0usize;
    for chunk in rows.chunks(64) {
        let texts: Vec<&str> = chunk.iter().map(|(t, _, _)| t.as_str()).collect();
        let embedded = encoder.embed(&texts).map_err(|e| e.to_string())?;
        let mut classified = Vec::with_capacity(chunk.len());
        for e in &embedded {
            classified.push(head.classify(e, 1).map_err(|e| e.to_string())?);
        }
        let second: Vec<usize> = (0..chunk.len())
            .filter(|&i| classified[i].needs_base)
            .collect();
        if !second.is_empty() {
            let again: Vec<&str> = second.iter().map(|&i| texts[i]).collect();
            for (&i, e) in second
                .iter()
                .zip(base.embed(&again).map_err(|e| e.to_string())?)
            {
                head.second_opinion(&mut classified[i], &e.vector);
            }
        }
        for ((_, label, domain), c) in chunk.iter().zip(classified) {
            let known = label == OOS || labels.intent_domain.contains_key(label);
            if !known {
                unknown += 1;
            }
            let expected = if known { label.clone() } else { OOS.to_owned() };
            let c = c.classification;
            let best_intent = c.intent.map(|l| l.name).unwrap_or_default();
            outcomes.push(Outcome {
                expected_domain: (expected != OOS)
                    .then(|| {
                        domain
                            .clone()
                            .or_else(|| labels.intent_domain.get(&expected).cloned())
                    })
                    .flatten(),
                predicted: if c.out_of_scope {
                    OOS.to_owned()
                } else {
                    best_intent.clone()
                },
                best_intent,
                predicted_domain: c.domain.map(|l| l.name).unwrap_or_default(),
                expected,
            });
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut r = report(&outcomes, unknown, usize::MAX);
    r.model_id = head.model_id().to_owned();
    r.data = args.data.display().to_string();
    r.texts_per_second = outcomes.len() as f64 / seconds.max(1e-9);
    let json_path = args.json.clone().unwrap_or_else(|| {
        let stem = args
            .data
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        args.head
            .join(format!("eval-{}.json", dataset::slug(&stem)))
    });
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", json_path.display()))?;
    eprintln!("eval: report written to {}", json_path.display());
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(expected: &str, predicted: &str, best: &str) -> Outcome {
        Outcome {
            expected: expected.into(),
            predicted: predicted.into(),
            best_intent: best.into(),
            expected_domain: (expected != OOS).then(|| "d".into()),
            predicted_domain: "d".into(),
        }
    }

    #[test]
    fn figures_of_a_small_run() {
        let outcomes = vec![
            o("a", "a", "a"),
            o("a", "b", "b"),
            o("a", OOS, "a"),
            o("b", "b", "b"),
            o(OOS, OOS, "a"),
            o(OOS, "a", "a"),
        ];
        let r = report(&outcomes, 1, 10);
        assert_eq!((r.texts, r.in_scope_texts, r.out_of_scope_texts), (6, 4, 2));
        assert!((r.accuracy - 3.0 / 6.0).abs() < 1e-12);
        assert!((r.in_scope_accuracy - 2.0 / 4.0).abs() < 1e-12);
        assert!((r.intent_accuracy_before_rule - 3.0 / 4.0).abs() < 1e-12);
        assert_eq!(r.out_of_scope_recall, Some(0.5));
        assert_eq!(r.out_of_scope_precision, Some(0.5));
        assert_eq!(r.domain_accuracy, Some(1.0));
        let a = r
            .per_intent
            .iter()
            .find(|s| s.intent == "a")
            .map(|s| (s.precision, s.recall));
        assert_eq!(a, Some((0.5, 1.0 / 3.0)));
        assert_eq!(r.confusions.len(), 3);
        assert!(table(&r, 5).contains("macro F1"));
    }
}
