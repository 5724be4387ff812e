//! Durable leaderboard store on redb. Placeholder.
