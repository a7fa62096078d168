//! A stratified, seeded validation split: every label keeps the same share
//! of its examples for validation, so rare intents are validated too and a
//! frequent one does not crowd the others out.

use std::collections::BTreeMap;

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

/// `(text, label)` pairs.
pub type Pairs = Vec<(String, String)>;

/// Splits `(text, label)` pairs into `(train, val)`: for each label (in
/// sorted order), its examples are shuffled with ChaCha8 seeded by `seed`
/// and `round(n × share)` of them go to validation, never all of them (a
/// label with one example stays in training). Both halves keep the input's
/// order. Deterministic for a seed on every platform (ChaCha8 is specified
/// bit for bit).
pub fn stratified(pairs: Pairs, share: f64, seed: u64) -> (Pairs, Pairs) {
    let share = share.clamp(0.0, 1.0);
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (_, label)) in pairs.iter().enumerate() {
        by_label.entry(label.as_str()).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut in_val = vec![false; pairs.len()];
    for indices in by_label.values_mut() {
        indices.shuffle(&mut rng);
        let n = indices.len();
        let take = ((n as f64 * share).round() as usize).min(n.saturating_sub(1));
        for &i in &indices[..take] {
            in_val[i] = true;
        }
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (pair, v) in pairs.into_iter().zip(in_val) {
        if v {
            val.push(pair);
        } else {
            train.push(pair);
        }
    }
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(counts: &[(&str, usize)]) -> Vec<(String, String)> {
        counts
            .iter()
            .flat_map(|(l, n)| (0..*n).map(move |i| (format!("{l} {i}"), (*l).to_owned())))
            .collect()
    }

    #[test]
    fn every_label_keeps_its_share_and_the_split_is_seeded() {
        let data = pairs(&[("a", 100), ("b", 10), ("c", 1), ("d", 3)]);
        let (train, val) = stratified(data.clone(), 0.2, 7);
        let count = |v: &[(String, String)], l: &str| v.iter().filter(|(_, x)| x == l).count();
        assert_eq!(count(&val, "a"), 20);
        assert_eq!(count(&val, "b"), 2);
        assert_eq!(count(&val, "c"), 0);
        assert_eq!(count(&val, "d"), 1);
        assert_eq!(train.len() + val.len(), data.len());
        assert_eq!(stratified(data.clone(), 0.2, 7).1, val);
        assert_ne!(stratified(data, 0.2, 8).1, val);
    }
}
