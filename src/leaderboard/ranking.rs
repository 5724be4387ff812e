//! Order-statistic ranking of one board (pure, no IO). Placeholder.
