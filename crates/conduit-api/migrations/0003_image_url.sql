-- The first frame of an image-to-video task (`image_url`): an http(s) URL or a
-- data:image/png|jpeg;base64 URI of up to 10 MiB decoded, kept so a retry or a republished
-- job carries it again. NULL for text-to-video tasks and every task before this column.

ALTER TABLE tasks ADD COLUMN IF NOT EXISTS image_url text;
