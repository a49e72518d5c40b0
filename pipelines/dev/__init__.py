"""Development tooling, apart from the pipelines users call: the seeded tiny offline models, the
procedural sample set, the demo and its HTML report (as haystack keeps ``haystack/testing``)."""
