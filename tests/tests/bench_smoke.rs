//! Runs the benchmark tool end to end with tiny counts against the debug binaries, so it
//! keeps working as the services change. It asserts that every phase produced figures,
//! never how fast anything was.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_smoke_runs_every_phase() {
    let bin_dir = conduit_testkit::stack::debug_bin_dir();
    let report = conduit_bench::run(conduit_bench::Options::smoke(bin_dir))
        .await
        .expect("the smoke benchmark runs");

    assert_eq!(report.submit.len(), 2, "two submit client counts");
    for row in &report.submit {
        assert!(row.accepted > 0, "some submits were accepted: {row:?}");
    }
    let delivery = report.delivery.as_ref().expect("delivery figures");
    assert!(delivery.sender_rate > 0.0, "{delivery:?}");
    let paced = report.paced.as_ref().expect("paced latency figures");
    assert_eq!(paced.delivered, paced.published, "{paced:?}");
    let isolation = report.isolation.as_ref().expect("isolation figures");
    assert!(isolation.healthy_delivered > 0, "{isolation:?}");
    assert!(report.render.as_ref().is_some_and(|r| r.frames > 0));
    assert!(report.scale_out.is_some());
    assert!(
        report
            .memory
            .iter()
            .any(|m| m.service == "conduit-webhook-sender"),
        "{:?}",
        report.memory
    );
    // The Markdown writer handles the result too.
    let md = conduit_bench::report::render_markdown(&report);
    assert!(md.contains("### Targets"));
}
