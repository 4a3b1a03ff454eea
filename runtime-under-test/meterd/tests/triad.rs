//! A licence server triad of three real members in one process, over mutual TLS on loopback:
//! a leader is elected, seats are counted once across the triad, a follower names the leader,
//! losing the leader keeps the service going (a retried grant is not granted twice), losing two
//! stops new grants, a member that restarts catches up, a peer with an unknown certificate is
//! refused, commands asked for at once share entries yet each gets its own answer, a
//! follower's own commands reach the ledger through the leader, and a leader isolated after
//! its machine was reverted commits nothing and gives way to a leader of a later term.

use std::time::{Duration, Instant};

use meter_core::seat_ledger::{LedgerCommand, LedgerOutcome};
use meterd::tls::Identity;
use meterd::triad::{TriadError, TriadTiming};
use meterd::triad_local::LoopbackTriad;
use meterd::triad_network::member_apps_holder;
use meterd::triad_types::MemberId;

const PRODUCT: u64 = 1001;
const WAIT: Duration = Duration::from_secs(20);

fn timing() -> TriadTiming {
    TriadTiming {
        heartbeat_ms: 100,
        election_min_ms: 400,
        election_max_ms: 800,
        write_timeout: Duration::from_secs(3),
        lease_grace_ms: 5_000,
    }
}

fn grant(request: u64, holder: &str) -> LedgerCommand {
    LedgerCommand::Grant {
        request,
        product: PRODUCT,
        quantity: 2,
        holder: holder.into(),
        lease_ms: 60_000,
    }
}

/// Waits until the running members applied the leader's log; each then holds `seats`.
async fn every_member_holds(triad: &LoopbackTriad, seats: u32) {
    triad.settle(WAIT).await.unwrap();
    for member in triad.running().values() {
        assert_eq!(
            member.ledger().in_use(PRODUCT).await,
            seats,
            "member {}",
            member.id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triad_counts_seats_once_and_survives_one_member_but_not_two() {
    let dir = tempfile::tempdir().unwrap();
    let mut triad = LoopbackTriad::start(dir.path().to_owned(), 3, timing())
        .await
        .unwrap();
    let leader = triad.leader(WAIT).await.unwrap();
    let lead = triad.member(leader).unwrap();

    // Two seats across the triad, whichever member serves.
    assert!(matches!(
        lead.submit(grant(1, "a")).await.unwrap(),
        LedgerOutcome::Granted { .. }
    ));
    let granted_b = lead.submit(grant(1, "b")).await.unwrap();
    assert!(matches!(granted_b, LedgerOutcome::Granted { .. }));
    assert_eq!(
        lead.submit(grant(1, "c")).await.unwrap(),
        LedgerOutcome::NoSeat { in_use: 2 }
    );
    every_member_holds(&triad, 2).await;

    // A follower does not grant: it names the leader.
    let follower = triad
        .running()
        .keys()
        .copied()
        .find(|id| *id != leader)
        .unwrap();
    match triad.member(follower).unwrap().submit(grant(2, "c")).await {
        Err(TriadError::NotLeader {
            leader: Some(named),
        }) => {
            assert_eq!(named, triad.members()[&leader]);
        }
        other => panic!("a follower answered {other:?}"),
    }

    // The leader goes: the other two elect one and serve on.
    let lost = Instant::now();
    triad.stop_member(leader).await;
    let new_leader = triad.leader(WAIT).await.unwrap();
    assert_ne!(new_leader, leader);
    let lead = triad.member(new_leader).unwrap();
    // b asks again (its answer lost with the old leader): the same lease, not a second seat.
    assert_eq!(lead.submit(grant(1, "b")).await.unwrap(), granted_b);
    eprintln!(
        "failover: leader stopped → first answer from the new leader in {} ms",
        lost.elapsed().as_millis()
    );
    let LedgerOutcome::Granted { lease, .. } = granted_b else {
        unreachable!()
    };
    assert_eq!(
        lead.submit(LedgerCommand::Release {
            lease,
            holder: "b".into()
        })
        .await
        .unwrap(),
        LedgerOutcome::Released
    );
    assert!(matches!(
        lead.submit(grant(3, "c")).await.unwrap(),
        LedgerOutcome::Granted { .. }
    ));

    // The old leader restarts from its storage and catches up with what it missed.
    triad.start_member(leader).await.unwrap();
    every_member_holds(&triad, 2).await;

    // Two members gone: nothing new is granted.
    let leader = triad.leader(WAIT).await.unwrap();
    let others: Vec<MemberId> = triad
        .running()
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    for id in others {
        triad.stop_member(id).await;
    }
    match triad.member(leader).unwrap().submit(grant(4, "d")).await {
        Err(TriadError::NoQuorum(_)) => {}
        other => panic!("a lone member answered {other:?}"),
    }
    triad.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_a_lease_that_ran_out_during_the_election() {
    let dir = tempfile::tempdir().unwrap();
    let mut triad = LoopbackTriad::start(dir.path().to_owned(), 3, timing())
        .await
        .unwrap();
    let leader = triad.leader(WAIT).await.unwrap();
    let short = LedgerCommand::Grant {
        request: 1,
        product: PRODUCT,
        quantity: 1,
        holder: "a".into(),
        lease_ms: 300,
    };
    let lead = triad.member(leader).unwrap();
    assert!(matches!(
        lead.submit(short).await.unwrap(),
        LedgerOutcome::Granted { .. }
    ));
    // The leader goes; the election takes longer than a's lease, which nobody could renew.
    triad.stop_member(leader).await;
    let new_leader = triad.leader(WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let other = LedgerCommand::Grant {
        request: 1,
        product: PRODUCT,
        quantity: 1,
        holder: "b".into(),
        lease_ms: 300,
    };
    assert_eq!(
        triad
            .member(new_leader)
            .unwrap()
            .submit(other)
            .await
            .unwrap(),
        LedgerOutcome::NoSeat { in_use: 1 },
        "a's seat went to b: no grace after the election"
    );
    triad.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_an_unknown_certificate_is_not_answered() {
    use futures::{SinkExt, StreamExt};
    let dir = tempfile::tempdir().unwrap();
    let triad = LoopbackTriad::start(dir.path().to_owned(), 3, timing())
        .await
        .unwrap();
    triad.leader(WAIT).await.unwrap();
    let stranger = Identity::generate().unwrap();
    let target = &triad.members()[&1];
    let pin = meterd::tls::parse_pin(&target.pin).unwrap();
    let config = meterd::tls::client_config(pin, &stranger).unwrap();
    let tcp = tokio::net::TcpStream::connect(&target.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(meterd::tls::server_name(), tcp)
        .await;
    // The handshake may finish (the member checks the pin after it), but no call is answered.
    if let Ok(stream) = tls {
        let mut link =
            tokio_util::codec::Framed::new(stream, tokio_util::codec::LengthDelimitedCodec::new());
        let _ = link.send(bytes::Bytes::from_static(b"{\"Vote\":{}}")).await;
        let answer = tokio::time::timeout(Duration::from_secs(5), link.next()).await;
        assert!(
            matches!(answer, Ok(None) | Ok(Some(Err(_)))),
            "a stranger got an answer: {answer:?}"
        );
    }
    triad.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_asked_at_once_share_entries_and_each_gets_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let triad = LoopbackTriad::start(dir.path().to_owned(), 3, timing())
        .await
        .unwrap();
    let leader = triad.leader(WAIT).await.unwrap();
    let lead = triad.member(leader).unwrap();
    // The new leader's grace goes in first, on its own.
    lead.submit(LedgerCommand::Renew {
        holder: "nobody".into(),
        lease_ms: 1,
    })
    .await
    .unwrap();
    let before = lead.applied_index().unwrap_or(0);
    // Forty askers at once for 25 seats: exactly 25 leases, each asker its own.
    let asks = (0..40u64).map(|i| {
        lead.submit(LedgerCommand::Grant {
            request: i,
            product: PRODUCT,
            quantity: 25,
            holder: format!("holder-{i}"),
            lease_ms: 60_000,
        })
    });
    let answers = futures::future::join_all(asks).await;
    let leases: std::collections::BTreeSet<u64> = answers
        .iter()
        .filter_map(|answer| match answer {
            Ok(LedgerOutcome::Granted { lease, .. }) => Some(*lease),
            _ => None,
        })
        .collect();
    assert_eq!(leases.len(), 25, "{answers:?}");
    let refused = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(LedgerOutcome::NoSeat { in_use: 25 })))
        .count();
    assert_eq!(refused, 15, "{answers:?}");
    // They went in a few entries, not forty.
    let entries = lead.applied_index().unwrap_or(0) - before;
    assert!(entries <= 10, "{entries} entries for 40 commands");
    every_member_holds(&triad, 25).await;
    triad.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_commits_its_own_seats_through_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut triad = LoopbackTriad::start(dir.path().to_owned(), 3, timing())
        .await
        .unwrap();
    let leader = triad.leader(WAIT).await.unwrap();
    let follower = *triad.running().keys().find(|id| **id != leader).unwrap();
    let on_follower = triad.member(follower).unwrap();
    let holders: std::collections::BTreeMap<MemberId, String> = triad
        .members()
        .iter()
        .map(|(id, member)| (*id, member_apps_holder(&member.pin)))
        .collect();
    let apps_of = |id: MemberId| holders[&id].clone();
    let followers_apps = apps_of(follower);

    // Asked of the follower itself, a command is refused (client runtimes go to the leader)...
    assert!(matches!(
        on_follower.submit(grant(1, &followers_apps)).await,
        Err(TriadError::NotLeader { .. })
    ));
    // ...and forwarded, the leader commits it: one seat of two, counted on every member.
    assert!(matches!(
        on_follower
            .submit_anywhere(grant(1, &followers_apps))
            .await
            .unwrap(),
        LedgerOutcome::Granted { .. }
    ));
    let lead = triad.member(leader).unwrap();
    assert!(matches!(
        lead.submit(grant(2, "client")).await.unwrap(),
        LedgerOutcome::Granted { .. }
    ));
    assert!(matches!(
        on_follower
            .submit_anywhere(grant(3, &followers_apps))
            .await
            .unwrap(),
        LedgerOutcome::NoSeat { in_use: 2 }
    ));
    // A member forwards only its own apps' seats: not the client's, not another member's.
    let other = *triad
        .running()
        .keys()
        .find(|id| **id != leader && **id != follower)
        .unwrap();
    assert!(matches!(
        triad
            .member(other)
            .unwrap()
            .submit_anywhere(LedgerCommand::Release {
                lease: 1,
                holder: followers_apps.clone(),
            })
            .await,
        Err(TriadError::NotItsOwn)
    ));
    every_member_holds(&triad, 2).await;

    // The leader gone, a follower forwards nothing until the others elect a new one.
    triad.stop_member(leader).await;
    let new_leader = triad.leader(WAIT).await.unwrap();
    let forwarding = *triad
        .running()
        .keys()
        .find(|id| **id != new_leader)
        .unwrap();
    let released = triad
        .member(forwarding)
        .unwrap()
        .submit_anywhere(LedgerCommand::Reclaim {
            holder: apps_of(forwarding),
            requests: vec![],
            lease_ms: 60_000,
            as_of: None,
        })
        .await
        .unwrap();
    assert!(matches!(released, LedgerOutcome::Reclaimed { .. }));
    // Its reclaim naming no seat gave back its apps' seats (the follower's, if it forwarded).
    let left = if forwarding == follower { 1 } else { 2 };
    every_member_holds(&triad, left).await;
    triad.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_commits_nothing_and_gives_way_to_a_later_term() {
    let dir = tempfile::tempdir().unwrap();
    let triad = LoopbackTriad::start(dir.path().to_owned(), 3, timing())
        .await
        .unwrap();
    let leader = triad.leader(WAIT).await.unwrap();
    let lead = triad.member(leader).unwrap();
    assert!(matches!(
        lead.submit(grant(1, "a")).await.unwrap(),
        LedgerOutcome::Granted { .. }
    ));
    let term = lead.metrics().borrow().current_term;

    // Its machine went back to a snapshot: it still believes it leads, but commits nothing.
    lead.isolate(Duration::from_secs(2));
    assert!(lead.submit(grant(2, "b")).await.is_err());
    // The other two elect a leader of a later term, which serves.
    let others: Vec<MemberId> = triad
        .running()
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    let deadline = Instant::now() + WAIT;
    let new_leader = loop {
        if let Some(id) = others.iter().find(|id| triad.member(**id).unwrap().leads()) {
            break *id;
        }
        assert!(Instant::now() < deadline, "no other member took the lead");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(matches!(
        triad
            .member(new_leader)
            .unwrap()
            .submit(grant(3, "c"))
            .await
            .unwrap(),
        LedgerOutcome::Granted { .. }
    ));
    // Isolation over, it hears of the later term and follows; every member holds the two
    // committed seats, none of the isolated leader's.
    assert_eq!(triad.leader(WAIT).await.unwrap(), new_leader);
    assert!(lead.metrics().borrow().current_term > term);
    every_member_holds(&triad, 2).await;
    triad.stop().await;
}
