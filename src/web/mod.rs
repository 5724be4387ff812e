//! The embedded leaderboard web page. Placeholder.
