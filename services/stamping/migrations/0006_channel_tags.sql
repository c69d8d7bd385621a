-- Each channel's last start tag given out (services/stamping/fair_queue.py). A batch takes its channels' tags
-- here in one short statement of its own, before the transaction that queues its rows, so two workers
-- queueing one channel's requests in the same moment get tags that follow each other. Read from the
-- queued rows inside that transaction instead, each saw none of the other's rows (not committed yet) and
-- both gave the channel the same tags: two rows a tag, twice its share.
CREATE TABLE channel_tags (
    channel_id text   PRIMARY KEY,
    last_tag   float8 NOT NULL
);
INSERT INTO channel_tags (channel_id, last_tag) SELECT channel_id, max(start_tag) FROM schedule GROUP BY channel_id;
