"""Local tooling: a whole cluster on one machine (`tandem up`, tests, benchmarks, chaos),
its supervisor, its etcd, and the generated demo model."""
