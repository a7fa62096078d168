//! Reading a process's Prometheus `/metrics`.

/// The sum of every sample of `name` at `url` (e.g.
/// `http://127.0.0.1:9102/metrics`) whose labels contain all of `labels`
/// (each written as in the exposition, `grpc_method="Generate"`); 0 when
/// there is none.
pub async fn sum(url: &str, name: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
