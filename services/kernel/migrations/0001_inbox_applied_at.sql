-- The inbox pruner (inbox.Pruner) finds claims by age. BRIN: claims arrive in time order, so a block
-- range summary finds the old ones at almost no cost to each claim's insert (a b-tree would add an
-- index write to every event applied).
CREATE INDEX IF NOT EXISTS inbox_applied_at ON inbox USING brin (applied_at);
