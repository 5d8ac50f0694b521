-- Rows shared by many users: `enable_feed(..., owner_claim => 'org_id')` compares a feed's
-- owner column with that claim of the token instead of `sub` (SPEC.md, "Rows shared by many
-- users"). The claim is the service's business: the triggers do not change, only the feed's
-- record.
--
-- The form with owner_claim is a function of its own beside the earlier one, with
-- owner_claim required: a call that does not name it resolves to the earlier form as it
-- always did (a released file run again with psql included), and leaves a feed's claim as
-- it is. Which also means: a feed's claim changes only when owner_claim is given (null: the
-- owners are compared with `sub` again).

alter table streamer.feeds add column if not exists owner_claim text;

create or replace function streamer.enable_feed(
    tbl regclass,
    owner_column text,
    owner_claim text,
    event text default null,
    terminal text default null,
    columns text[] default null,
    replace boolean default false
) returns void
language plpgsql set client_min_messages = warning as $claim$
declare
    existing streamer.feeds;
begin
    -- A claim's name, or a dotted path into the token's objects; its values are compared
    -- by the service, never by SQL.
    if owner_claim is not null and (owner_claim !~ '^[^.[:cntrl:]]+(\.[^.[:cntrl:]]+)*$'
                                    or length(owner_claim) > 200) then
        raise exception 'streamer: owner_claim must be a claim''s name or a dotted path into the token''s claims (app_metadata.org_id), not %',
            quote_literal(owner_claim);
    end if;
    select * into existing from streamer.feeds f where f.tbl = enable_feed.tbl;
    if existing.name is not null and not replace
       and existing.owner_claim is distinct from enable_feed.owner_claim then
        raise exception 'streamer: % is a feed already (owner claim %): enable_feed(..., replace => true) changes its settings',
            tbl, coalesce(quote_literal(existing.owner_claim), 'none, the owners are sub');
    end if;
    perform streamer.enable_feed(tbl, owner_column => owner_column, event => event,
                                 terminal => terminal, columns => columns, replace => replace);
    update streamer.feeds f set owner_claim = enable_feed.owner_claim
    where f.tbl = enable_feed.tbl and f.owner_claim is distinct from enable_feed.owner_claim;
    if found then
        -- Its streams end and start again under the new rule.
        perform streamer.feeds_changed();
    end if;
end
$claim$;

-- The same with the table's name as text, resolved in the caller's search path.
create or replace function streamer.enable_feed(
    tbl text,
    owner_column text,
    owner_claim text,
    event text default null,
    terminal text default null,
    columns text[] default null,
    replace boolean default false
) returns void
language sql as $$
    select streamer.enable_feed(tbl::regclass, owner_column => owner_column,
                                owner_claim => owner_claim, event => event,
                                terminal => terminal, columns => columns, replace => replace)
$$;
