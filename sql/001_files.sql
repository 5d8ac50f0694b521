-- The table a file processor writes to. It knows nothing of the feed: any program
-- (a worker, a cron job, a person at psql) just inserts, updates and deletes rows.

create table if not exists files (
    id               uuid primary key default gen_random_uuid(),
    user_id          uuid not null,
    filename         text not null,
    file_type        text,
    status           text not null default 'pending'
                     check (status in ('pending', 'processing', 'ready', 'failed')),
    progress         integer not null default 0 check (progress between 0 and 100),
    processing_stage text,
    error_message    text,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);

-- A user's stream reads "my files"; user_id is never updated in the hot path, so this
-- index does not stop progress updates from being HOT updates.
create index if not exists files_user_id_idx on files (user_id);

create or replace function files_touch_updated_at() returns trigger
language plpgsql as $$
begin
    new.updated_at := now();
    return new;
end
$$;

drop trigger if exists files_touch_updated_at on files;
create trigger files_touch_updated_at
    before update on files
    for each row execute function files_touch_updated_at();
